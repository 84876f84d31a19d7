"""Rows each preference file keeps at each data.max_length with a model's tokenizer and template (issue 27).

Run: PYTHONPATH=. python benchmarks/preference_rows.py [MODEL] (default builtin:smollm2-135m-instruct; needs
../shared/data/preference). Prints one line per file and length: rows kept, pref_dropped_rows, median length.
"""

import json
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from tasks.modeling import builtin_model_path
from tasks.objectives.instruction.chat import resolve_template
from tasks.objectives.instruction.settings import InstructionSettings
from tasks.objectives.preference import DataOptions, encode_all, normalize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference"


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "builtin:smollm2-135m-instruct"
    path = builtin_model_path(model.removeprefix("builtin:")) if model.startswith("builtin:") else Path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = resolve_template(tokenizer, InstructionSettings(template="tokenizer"))
    print(f"{model}: template {template.name}")
    for name in ("dpo_en_demo", "kto_en_demo"):
        normal = normalize(json.loads((DATA / f"{name}.json").read_text()), DataOptions(), name)
        for max_length in (256, 512, 1024, 2048):
            started = time.perf_counter()
            encoded, dropped = encode_all(normal.rows, tokenizer, template, max_length, normal.paired)
            seconds = time.perf_counter() - started
            if normal.paired:
                lengths = sorted(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in encoded)
            else:
                lengths = sorted(len(r["input_ids"]) for r in encoded)
            print(
                f"{name} ({normal.format}, {len(normal.rows)} rows, {normal.equal_dropped} chosen == rejected) "
                f"max_length {max_length}: kept {len(encoded)}, pref_dropped_rows {dropped}, "
                f"median length {lengths[len(lengths) // 2]}, encoded in {seconds:.2f} s"
            )


if __name__ == "__main__":
    main()
