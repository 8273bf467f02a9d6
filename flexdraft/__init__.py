import os

# Large CPU tensors (weights, their packed copies, KV caches) on 2 MB pages where the kernel allows it (transparent
# huge pages in "madvise" mode): a decode step streams ~0.6 GB of weights, ~150k pages of 4 KB. PyTorch reads this at
# its first allocation, so it is set before torch is imported; an explicit setting wins. On the Xeon: steps 2-6% faster.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
