"""Measurements on the running device: the roofline harness and crossover (``flexdraft roofline``), the batch-sweep
benchmark (``flexdraft bench``) and the generated performance reports (``flexdraft report``)."""
