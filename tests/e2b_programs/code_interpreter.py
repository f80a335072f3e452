"""Written the way E2B's code interpreter documentation shows it (blocking SDK)."""

from e2b_code_interpreter import Sandbox

with Sandbox.create() as sandbox:
    sandbox.run_code("x = 1")
    for _ in range(49):
        sandbox.run_code("x += 1")
    execution = sandbox.run_code("x")
    print("x:", execution.text)

    execution = sandbox.run_code("print('hello world')")
    print("logs:", execution.logs.stdout)

    execution = sandbox.run_code("1 / 0")
    print("error:", execution.error.name, execution.error.value)

    context = sandbox.create_code_context()
    sandbox.run_code("y = 'in a context'", context=context)
    print("context:", sandbox.run_code("y", context=context).text)

    seen = []
    sandbox.run_code("print('a'); print('b')", on_stdout=lambda m: seen.append(m.line))
    print("streamed:", seen)

    during = sandbox.run_code("import os; os.environ['STAGE']", envs={"STAGE": "per cell"})
    after = sandbox.run_code("os.environ.get('STAGE', 'unset')")
    print("cell env:", during.text.strip("'") + "; after:", after.text.strip("'"))

    files = sandbox.files.list("/")
    print("root has tmp:", any(f.name == "tmp" for f in files))
    print("id:", sandbox.sandbox_id.startswith("sb-"))
