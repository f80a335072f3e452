"""Written the way E2B's SDK documentation shows it (async SDK): commands with
callbacks and background handles, files, timeouts, info, listing, kill."""

import asyncio

from e2b_code_interpreter import AsyncSandbox, CommandExitException, FilesystemEvent


async def main() -> None:
    sandbox = await AsyncSandbox.create(metadata={"suite": "e2b-compat"}, envs={"GREETING": "hi"})
    try:
        result = await sandbox.commands.run("echo $GREETING from $(pwd)")
        print("run:", result.stdout.strip(), result.exit_code)

        lines: list[str] = []
        await sandbox.commands.run("echo one; echo two", on_stdout=lines.append)
        print("callbacks:", "".join(lines).split())

        try:
            await sandbox.commands.run("echo nope >&2; exit 7")
        except CommandExitException as e:
            print("exit exception:", e.exit_code, e.stderr.strip())

        command = await sandbox.commands.run("sleep 30", background=True)
        print("background pid:", command.pid > 0)
        print("listed:", any(p.pid == command.pid for p in await sandbox.commands.list()))
        print("killed:", await command.kill())

        info = await sandbox.files.write("/tmp/data/hello.txt", "hello file")
        print("wrote:", info.path, info.type.value)
        print("read:", await sandbox.files.read("/tmp/data/hello.txt"))
        print("exists:", await sandbox.files.exists("/tmp/data/hello.txt"))
        entries = await sandbox.files.list("/tmp/data")
        print("list:", [(e.name, e.type.value, e.size) for e in entries])

        events: list[FilesystemEvent] = []
        handle = await sandbox.files.watch_dir("/tmp/data", on_event=events.append)
        await sandbox.files.write("/tmp/data/watched.txt", "hi")
        for _ in range(100):
            if any(e.name == "watched.txt" for e in events):
                break
            await asyncio.sleep(0.1)
        await handle.stop()
        print("watched:", sorted({e.type.value for e in events if e.name == "watched.txt"}))

        await sandbox.set_timeout(120)
        info = await sandbox.get_info()
        print("info:", info.metadata["suite"])
        print("running:", await sandbox.is_running())
    finally:
        print("kill:", await sandbox.kill())


asyncio.run(main())
