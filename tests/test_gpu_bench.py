"""The GPU bench, rehearsed on the CPU: the payload fits the device's per-call limit, the target is rebuilt from
the GGUF parts with the evaluation prompts beside it in a cache of its own, and the roofline harness and both
benches leave their JSONs, the flex store the benches read among them, within what a call may return."""
import json

import pytest
from test_gpu_train import landed

pytestmark = pytest.mark.real_model


def test_prepare_and_run_rehearse_the_gpu_bench(tmp_path, monkeypatch):
    from experiments import gpu_bench

    folders = gpu_bench.prepare(tmp_path / "payload", call_mib=40)
    assert len(folders) == 3   # ~86 MiB of compressed GGUF and the small files, 40 MiB at a time
    there = landed(folders, tmp_path / "there", 40)

    monkeypatch.setenv("FLEXDRAFT_CACHE", str(tmp_path / "cache"))   # the GPU machine's own, empty, cache
    out = tmp_path / "out"
    summary = gpu_bench.run(there, out, minutes=5, dry_run=True, threads=1)
    assert summary["steps"]["roofline"] == 0 and summary["steps"]["bench-batched"] == 0, summary
    assert summary["steps"]["bench-batch1"] == 0, summary
    returned = list(out.iterdir())
    assert len(returned) <= 8 and all(p.stat().st_size < 16 * 2 ** 20 for p in returned), returned
    store = json.loads((out / "flex-store.json").read_text())
    (key,) = store["entries"]
    for name, batch in (("bench-batched", 2), ("bench-batch1", 1)):
        bench = json.loads((out / f"{name}.json").read_text())
        assert bench["cells_done"] == bench["cells_planned"] == 2   # MT-bench and HumanEval
        assert {m["batch_size"] for m in bench["measurements"]} == {batch}
        assert {m["config"] for m in bench["measurements"]} == {"ar", "parallel", "flex"}
        assert bench["provenance"]["threads"] == 1
        policy = bench["config"]["extra"]["flex_policy"]
        assert str(out / "flex-store.json") in policy["source"] and key in policy["source"]   # flex read this run's
    assert (tmp_path / "cache" / "data" / "mtbench.jsonl").is_file()
