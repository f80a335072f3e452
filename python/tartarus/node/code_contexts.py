"""Code contexts: separate interpreters in one sandbox, each with its own variables,
imports and working directory (what E2B's `create_code_context` gives). Each language
has a default context, made on its first cell (`default` for Python,
`default-javascript`, `default-bash`); others are made on request, up to
`MAX_CONTEXTS`, and all end with the sandbox."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from tartarus.api.types import CodeContextInfo, CodeExecution, CodeStreamEvent
from tartarus.errors import ConflictError, InvalidRequestError, NotFoundError
from tartarus.node.code_kernel import LANGUAGES, CodeKernel
from tartarus.runtime.base import Sandbox

DEFAULT = "default"


def default_context(language: str) -> str:
    return DEFAULT if language == "python" else f"{DEFAULT}-{language}"


_DEFAULTS = {default_context(language): language for language in LANGUAGES}
# Each context is an interpreter process in the sandbox, holding its memory.
MAX_CONTEXTS = 16


class CodeContexts:
    def __init__(self, sandbox: Sandbox, workdir: str) -> None:
        self._sandbox = sandbox
        self._workdir = workdir
        self._contexts: dict[str, tuple[CodeContextInfo, CodeKernel]] = {}

    def _add(self, context_id: str, language: str, cwd: str | None) -> CodeContextInfo:
        if len(self._contexts) >= MAX_CONTEXTS:
            raise ConflictError(
                f"this sandbox has {MAX_CONTEXTS} code contexts already (the most it may "
                "hold); remove one first",
                slug="too-many-code-contexts",
            )
        info = CodeContextInfo(id=context_id, language=language, cwd=cwd or self._workdir)
        kernel = CodeKernel(self._sandbox, cwd=info.cwd, language=language)
        self._contexts[context_id] = (info, kernel)
        return info

    def create(self, language: str, cwd: str | None) -> CodeContextInfo:
        return self._add(f"ctx-{secrets.token_hex(6)}", language, cwd)

    def list(self) -> list[CodeContextInfo]:
        return [info for info, _ in self._contexts.values()]

    def _get(self, context_id: str) -> tuple[CodeContextInfo, CodeKernel]:
        found = self._contexts.get(context_id)
        if found is None:
            if (language := _DEFAULTS.get(context_id)) is not None:
                self._add(context_id, language, None)
                return self._contexts[context_id]
            raise NotFoundError(
                f"code context {context_id} not found in this sandbox",
                slug="code-context-not-found",
            )
        return found

    async def run(
        self,
        code: str,
        *,
        context: str | None,
        language: str | None,
        timeout_s: float | None,
        env: dict[str, str] | None = None,
        on_event: Callable[[CodeStreamEvent], None] | None = None,
    ) -> CodeExecution:
        kernel = self.kernel_for(context, language)
        return await kernel.run(code, timeout_s, env=env, on_event=on_event)

    def kernel_for(self, context: str | None, language: str | None) -> CodeKernel:
        """The interpreter a cell runs in: `context`'s, else `language`'s default one."""
        info, kernel = self._get(context or default_context(language or "python"))
        if language is not None and language != info.language:
            raise InvalidRequestError(
                f"code context {info.id} runs {info.language}, not {language}",
                slug="code-context-language",
            )
        return kernel

    async def restart(self, context_id: str) -> CodeContextInfo:
        """Ends the context's interpreter; its next cell starts a fresh one."""
        info, kernel = self._get(context_id)
        await kernel.close()
        return info

    async def remove(self, context_id: str) -> None:
        _, kernel = self._get(context_id)
        del self._contexts[context_id]
        await kernel.close()

    async def close(self) -> None:
        for _, kernel in self._contexts.values():
            await kernel.close()
        self._contexts.clear()
