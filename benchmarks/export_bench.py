"""Export benchmark: onnxruntime CPU vs torch eager CPU latency on the same network, and
export wall time.

Run: python benchmarks/export_bench.py [--quick] [-o benchmarks/results/export.json]
Latencies are medians; compare the ratio (measured in one run, same input), not seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from common import median_time
from scnas.build import BuildConfig, build_network
from scnas.export import export_onnx
from scnas.genotype import builtin_genotype, random_genotype

console = Console()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-o", "--output", default="benchmarks/results/export.json")
    args = parser.parse_args()
    stems, sizes, repeat = ([8], [32], 1) if args.quick else ([16, 32], [64, 96], 3)
    genotypes = {"uresnet": builtin_genotype("uresnet"), "random-0": random_genotype(0)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, genotype in genotypes.items():
            for stem in stems:
                net = build_network(genotype, BuildConfig(stem_channels=stem)).eval()
                path = Path(folder) / f"{name}-{stem}.onnx"
                report = export_onnx(net, path)
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for size in sizes:
                    x = torch.randn(1, 4, size, size, size)
                    with torch.inference_mode():
                        torch_s = median_time(lambda: net(x), repeat)
                        reference = net(x).numpy()
                    feed = {"image": x.numpy()}
                    ort_s = median_time(lambda: session.run(None, feed), repeat)
                    diff = float(np.abs(session.run(None, feed)[0] - reference).max())
                    rows.append({"genotype": name, "stem": stem, "size": size, "torch_s": torch_s, "ort_s": ort_s,
                                 "ort_speedup": torch_s / ort_s, "max_abs_diff": diff,
                                 "export_s": report.export_seconds, "onnx_mib": report.file_bytes / 2 ** 20})
    table = Table("genotype", "stem", "input", "torch eager s", "onnxruntime s", "ORT speedup", "max |diff|", "export s",
                  title=f"ORT {ort.__version__} CPU vs torch {torch.__version__} eager CPU, {torch.get_num_threads()} "
                        "threads, batch 1, float32")
    for r in rows:
        table.add_row(r["genotype"], str(r["stem"]), f"4x{r['size']}^3", f"{r['torch_s']:.3f}", f"{r['ort_s']:.3f}",
                      f"{r['ort_speedup']:.2f}x", f"{r['max_abs_diff']:.1e}", f"{r['export_s']:.1f}")
    console.print(table)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                          "threads": torch.get_num_threads()}, "quick": args.quick, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
