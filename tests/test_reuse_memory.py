"""``common.fastpath.reuse_freed_memory``: glibc keeps freed tensors' memory for the next allocation.

Measured through the kernel's own count of minor page faults (``getrusage``): a 64 MiB tensor freed
and allocated again faults its pages in again under glibc's defaults (one fault per 4 KiB page,
unless transparent huge pages serve it), and almost not at all once the setting is applied. The
setting is process-wide and one-way, so each case runs in a fresh interpreter. Values never change:
a seeded training step gives bitwise the same weights with and without it.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from common.fastpath import reuse_freed_memory
from zoo_testing import BUNDLES

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_PROBE = r"""
import hashlib, json, resource, sys
import torch
from common.fastpath import reuse_freed_memory
torch.set_num_threads(1)
applied = reuse_freed_memory(sys.argv[1] == "on")

def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB, written to the end
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_allocation(), faults_of_one_allocation()  # the first ones grow the heap in any case
faults = [faults_of_one_allocation() for _ in range(5)]

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
opt = torch.optim.Adam(net.parameters())
x = torch.randn(2, 1, 16, 32, 32)
for _ in range(2):
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), x).backward()
    opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
print(json.dumps({"applied": applied, "faults": faults, "digest": digest}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting exists only for glibc's malloc")
def test_freed_memory_is_reused_without_new_page_faults_and_values_are_unchanged():
    on, off = _probe("on"), _probe("off")
    assert on["applied"] is True and off["applied"] is False
    pages = 64 * 2**20 // 4096
    # glibc's default: the 64 MiB block is mmapped and unmapped each time, so its pages fault again
    # (THP "always" would serve it with ~32 huge-page faults; this machine's setting is "madvise").
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[always]" not in thp:
        assert sorted(off["faults"])[2] > pages // 2, off
    assert sorted(on["faults"])[2] < pages // 50, on  # kept on the heap: reused as it is
    assert on["digest"] == off["digest"]  # the same arithmetic, bitwise


def test_switched_off_does_nothing():
    assert reuse_freed_memory(False) is False
    assert reuse_freed_memory("false") is False


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
@pytest.mark.parametrize("bundle", ["fnet_baseline", "unet3d_fucci"])
def test_bundles_apply_it_at_initialize_and_inference_ties_it_to_fast(bundle, config):
    from monai.bundle import ConfigParser

    for name in ["train.json", "multi_gpu_train.json", "inference.json"]:
        cfg = json.loads(open(os.path.join(BUNDLES, bundle, "configs", name)).read())
        assert "$common.fastpath.reuse_freed_memory(common.cli.as_bool(@reuse_memory, 'reuse_memory'))" in cfg["initialize"], name
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", config))
    parser["bundle_root"] = os.path.join(BUNDLES, bundle)
    if config == "train.json":
        assert parser.get_parsed_content("reuse_memory") is True
    else:
        assert parser.get_parsed_content("reuse_memory") is True
        parser["fast"] = "false"  # what --fast false gives
        assert parser.get_parsed_content("reuse_memory") is False
