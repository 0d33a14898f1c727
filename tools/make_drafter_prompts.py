"""Build the prompt set the shipped SmolLM2 drafter was trained on (the target writes the responses).

    python tools/make_drafter_prompts.py --gsm8k ../shared/data/gsm8k_train.jsonl --out drafter_prompts.jsonl

Three sources, none in an evaluation set (GSM8K test, HumanEval, MT-Bench; exact matches are dropped anyway):
- GSM8K train questions (MIT);
- "write a function" prompts from the CPython standard library: each public function's name, signature and
  the first paragraph of its docstring (PSF licence);
- general instructions assembled here from task templates and topics.
The output is deterministic: the same inputs give the same file, shuffled with a fixed seed.
"""

import argparse
import ast
import itertools
import json
import random
import sysconfig
from pathlib import Path

SKIPPED_FOLDERS = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "venv")
CODE_TEMPLATES = (
    "Write a Python function `{name}{signature}` that does the following: {doc}",
    "Implement `{name}{signature}` in Python. {doc} Explain your code briefly.",
    "Here is a docstring: \"{doc}\" Write the Python function `{name}{signature}` it describes.",
)
TASKS = (
    "Explain {topic} in simple terms.",
    "Give me three practical tips about {topic}.",
    "Write a short paragraph about {topic} for a school newsletter.",
    "What are the advantages and disadvantages of {topic}?",
    "Summarize what a beginner should know about {topic}.",
    "Write a short poem about {topic}.",
    "List five interesting facts about {topic}.",
    "Write a friendly email inviting a colleague to a talk on {topic}.",
    "How would you explain {topic} to a ten-year-old?",
    "Describe a common misconception about {topic} and correct it.",
)
TOPICS = (
    "photosynthesis", "the water cycle", "compound interest", "time management", "recycling", "volcanoes",
    "the French Revolution", "machine learning", "healthy sleep", "public speaking", "black holes", "vaccines",
    "the stock market", "learning a new language", "climate change", "the human heart", "electric cars",
    "gardening in small spaces", "the Roman Empire", "budgeting for students", "cloud computing", "bees",
    "the internet", "meditation", "renewable energy", "ancient Egypt", "chess openings", "baking bread",
    "job interviews", "the moon landing", "probability", "earthquakes", "team work", "the printing press",
    "password security", "coral reefs", "running a marathon", "the theory of evolution", "inflation",
    "writing a resume", "plate tectonics", "the immune system", "open source software", "classical music",
    "urban planning", "first aid", "the periodic table", "saving water at home", "social media", "hiking safely",
)


def gsm8k_questions(file: Path):
    return [json.loads(line)["question"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_paragraph(doc: str) -> str:
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def stdlib_sources():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.rglob("*.py")):
        parts = source.relative_to(stdlib).parts
        if not any(part in SKIPPED_FOLDERS or part.startswith(("_", "test")) for part in parts):
            yield source


def documented_functions(tree):
    """Public module functions and public methods of public classes, with their docstrings."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            methods = (item for item in node.body if isinstance(item, ast.FunctionDef))
            yield from (method for method in methods if not method.name.startswith("_"))


def code_prompts():
    prompts = []
    for source in stdlib_sources():
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in documented_functions(tree):
            doc = ast.get_docstring(node)
            if not doc or len(first_paragraph(doc)) < 30:
                continue
            signature = "(" + ast.unparse(node.args) + ")"
            template = CODE_TEMPLATES[len(prompts) % len(CODE_TEMPLATES)]
            prompts.append(template.format(name=node.name, signature=signature, doc=first_paragraph(doc)))
    return prompts


def instructions():
    return [task.format(topic=topic) for task, topic in itertools.product(TASKS, TOPICS)]


def evaluation_prompts():
    """The package's shipped evaluation sets: nothing here may appear in them."""
    folder = Path(__file__).resolve().parents[1] / "mlx_dllm" / "benchmark" / "prompts"
    seen = set()
    for file in folder.glob("*.jsonl"):
        seen.update(json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=Path, required=True, help="GSM8K train JSONL (question/answer)")
    parser.add_argument("--gsm8k-count", type=int, default=None, help="use only the first N GSM8K questions")
    parser.add_argument("--code-count", type=int, default=None, help="use only N code prompts (an even sample)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gsm8k = gsm8k_questions(args.gsm8k)[: args.gsm8k_count]
    held_back = evaluation_prompts()
    code = code_prompts()
    if args.code_count is not None and args.code_count < len(code):
        code = [code[i * len(code) // args.code_count] for i in range(args.code_count)]
    prompts = [p for p in dict.fromkeys(gsm8k + code + instructions()) if p not in held_back]
    random.Random(0).shuffle(prompts)
    with open(args.out, "w", encoding="utf-8") as handle:
        for prompt in prompts:
            handle.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
    print(f"{len(prompts)} prompts ({len(gsm8k)} GSM8K, {len(code)} code, {len(instructions())} general)")


if __name__ == "__main__":
    main()
