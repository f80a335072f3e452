"""An agent loop: the model writes code, the sandbox runs it, the model reads the error
and tries again, until the code works or it gives up.

No model is called here: `ScriptedModel` stands in for one with the turns a model
typically takes (a first draft with a bug, then a fix once it has seen the traceback).
Swap in your model's client where `ScriptedModel.next_code` is called.
"""

from __future__ import annotations

import anyio

from tartarus import Sandbox

TASK = "Compute the mean word length of the words in /tmp/words.txt, rounded to 2 places."
MAX_TURNS = 4


class ScriptedModel:
    """Answers with canned code; each answer depends on the error it was shown."""

    def next_code(self, task: str, error: str | None) -> str:
        if error is None:
            # The first draft forgets that the file's lines end with a newline.
            return (
                "words = open('/tmp/words.txt').read().split(' ')\n"
                "round(sum(len(w) for w in words) / len(wordz), 2)\n"
            )
        if "NameError" in error:
            return (
                "words = open('/tmp/words.txt').read().split()\n"
                "round(sum(len(w) for w in words) / len(words), 2)\n"
            )
        raise RuntimeError(f"the scripted model has no answer for {error!r}")


async def main() -> None:
    model = ScriptedModel()
    async with Sandbox.create("python", timeout=120) as sb:
        await sb.files.write("/tmp/words.txt", "the quick brown fox jumps over the lazy dog\n")
        error = None
        for turn in range(1, MAX_TURNS + 1):
            code = model.next_code(TASK, error)
            execution = await sb.run_code(code, timeout=30)
            if execution.error is None:
                print(f"turn {turn}: ok, the answer is {execution.text}")
                return
            error = f"{execution.error.name}: {execution.error.value}"
            print(f"turn {turn}: {error}; asking the model again")
        raise SystemExit(f"no working code after {MAX_TURNS} turns")


anyio.run(main)
