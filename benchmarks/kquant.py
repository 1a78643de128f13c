"""A K-quant mix of the default model beside llama.cpp: SmolLM2-135M requantized to Q4_K_M by
llama.cpp itself (llama_model_quantize with allow_requantize, from the shipped Q4_1 file), then
benchmarks/bench.py on it for cecollm and llama.cpp. SmolLM2's 576-wide rows are not whole 256-value
super-blocks, so llama.cpp falls back to Q5_0 for most matrices; Q4_K and Q6_K take the 1536-wide ones.

    .venv/bin/python benchmarks/kquant.py [--out /tmp/smollm2-q4_k_m.gguf] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/smollm2-q4_k_m.gguf")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import llama_cpp

    import cecollm

    if not os.path.exists(args.out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(cecollm.default_model_path().encode(), args.out.encode(), ctypes.byref(params)):
            raise SystemExit("llama_model_quantize failed")
    print(cecollm.load_model(args.out).info()["tensor_types"])
    bench = os.path.join(os.path.dirname(__file__), "bench.py")
    cmd = [sys.executable, bench, "--model", args.out, "--engines", "cecollm,llama.cpp", "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
