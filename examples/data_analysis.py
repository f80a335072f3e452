"""Data analysis in a sandbox: load a CSV with pandas, summarise it, and get a
matplotlib chart back as a PNG (on the `python-ds` template: numpy, pandas, scipy,
matplotlib).

A displayed DataFrame comes back as HTML and as data (`result.data`, JSON). The chart
is the cell's image result (`execution.results[...].png`, base64), written
here to chart.png in the current directory.
"""

from __future__ import annotations

import base64
import json

import anyio

from tartarus import Sandbox

CSV = """month,visitors
Jan,120
Feb,135
Mar,160
Apr,158
May,190
Jun,240
"""

ANALYSIS = """
import pandas as pd
import matplotlib.pyplot as plt

df = pd.read_csv('/tmp/visits.csv')
print(df.describe().loc[['mean', 'max']].to_string())
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(df['month'], df['visitors'])
ax.set_title('Visitors per month')
plt.show()
display(df.tail(2))
int(df['visitors'].idxmax())
"""


async def main() -> None:
    async with Sandbox.create("python-ds", timeout=300) as sb:
        await sb.files.write("/tmp/visits.csv", CSV)
        execution = await sb.run_code(ANALYSIS, timeout=120)
        if execution.error is not None:
            raise SystemExit(f"{execution.error.name}: {execution.error.value}")
        print("".join(execution.logs.stdout), end="")
        charts = [r.png for r in execution.results if r.png]
        # A displayed DataFrame comes back as an HTML table and as its data.
        table = next(r for r in execution.results if r.data)
        print("last rows:", json.loads(table.data)["data"], "(html too)" if table.html else "")
        await anyio.Path("chart.png").write_bytes(base64.b64decode(charts[0]))
        print(f"busiest month: row {execution.text}; chart.png written ({len(charts)} chart)")


anyio.run(main)
