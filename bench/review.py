"""`booruset review` on a workspace of N synthetic images (default 1,000,000): time to first byte
of grid pages 1, 100 and 10,000, with and without a filter, over HTTP from the real server.

The workspace holds only tables (images, tags, image_meta, captions, balance, duplicates, each
made by DuckDB): every row points at a member of the bundled sample, so thumbnails exist without
a million images. The server is `booruset review` in its own process on loopback.

Each figure is the median of 5 requests (after one warm-up request). Goal: every page ≤ 300 ms
to the first byte. The ratio compares keyset paging (what the server does) with the same page
by OFFSET, both timed as bare queries on the same review table in this process: what paging by
key saves on deep pages. Also timed: the server's start (it builds the review table) and one
edit (write, publish, refresh of the image's row).

    python bench/review.py            # 1,000,000 images
    python bench/review.py --quick    # 100,000 images
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import duckdb  # noqa: E402
import httpx  # noqa: E402
import pyarrow as pa  # noqa: E402

import schemas  # noqa: E402
from store.workspace import Workspace  # noqa: E402

GOAL_MS = 300.0
PAGE = 60
REPEATS = 5
FILTERS = {"none": {}, "sql": {"where": "rating = 'general' and n_people = 1"},
           "character": {"character": "character_0043"}}


def make_workspace(path: Path, n: int) -> Workspace:
    """Synthetic tables of n images; every row points at one of the sample's members."""
    ws = Workspace(str(path))
    shard = sorted((REPO / "sample" / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [m.name for m in tar if m.name.endswith((".jpg", ".png", ".webp"))]
    con = duckdb.connect()
    con.execute("create table ids as select range as i from range($n)", {"n": n})
    con.execute("create table members as select unnest($m) as member, generate_subscripts($m, 1) - 1 as m",
                {"m": members})
    def key_of(i: str) -> str:
        return f"'shards/part-' || lpad(({i} // 1000)::varchar, 5, '0') || '/' || lpad(({i})::varchar, 9, '0')"
    key = key_of("i")
    tables = {
        "images": f"""select {key} as key, $shard as source, mb.member, 'JPEG' as format, 'RGB' as mode,
                          1024 as width, 768 as height, 1 as n_frames, 200000::bigint as bytes,
                          md5(i::varchar) || md5((i + 1)::varchar) as sha256, 0::ubigint as phash
                      from ids join members mb on mb.m = i % $n_members""",
        "tags": f"""select {key} as key, 'tag_' || ((i * 7 + t * 131) % 5000)::varchar as tag, 'general' as category,
                        0.5::float as score, t::int as rank
                    from ids, range(10) as r(t)""",
        "image_meta": f"""select {key} as key, 1024 as width, 768 as height, (i % 3)::int as n_faces,
                              (i % 4)::int as n_people, (i % 2)::int as n_characters,
                              case when i % 2 = 1 then ['character_' || lpad((i % 1000)::varchar, 4, '0')]
                                   else []::varchar[] end as characters,
                              ['general', 'sensitive', 'questionable'][1 + i % 3] as rating
                          from ids""",
        "captions": f"""select {key} as key, 0 as attempt, 'template' as backend, 'A picture number ' || i as caption,
                            0.8::float as accuracy, true as accepted, false as flagged from ids""",
        "balance": f"""select {key} as key, 'group_' || (i % 50)::varchar as path, 1.0 as weight,
                           0.02 as probability, 1.0 + (i % 4) as multiply from ids""",
        "duplicates": f"""select {key} as key, {key_of("i - i % 2")}
                              as dup_group, i % 2 = 0 as is_representative, 'phash' as reason
                          from ids where i % 100 < 2""",
    }
    for name, sql in tables.items():
        params = {"shard": str(shard), "n_members": len(members)} if name == "images" else {}
        table = con.sql(sql, params=params).to_arrow_table()
        for field in schemas.TABLES[name]:
            if field.name not in table.column_names:
                table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
        ws.write_part(name, f"bench-{name}", table)
    ws.publish({"bench": {name: [f"bench-{name}"] for name in tables}})
    return ws


def start_server(path: Path, port: int) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "review", "-w", str(path), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    for line in server.stdout:
        print("  " + line.rstrip(), flush=True)
        if "review: open" in line:
            return server, time.perf_counter() - started
    raise SystemExit(f"review did not start (exit {server.wait()})")


def first_byte_ms(client: httpx.Client, url: str, params: dict) -> float:
    started = time.perf_counter()
    with client.stream("GET", url, params=params) as response:
        chunks = response.iter_raw()
        next(chunks)
        elapsed = (time.perf_counter() - started) * 1000
        for _ in chunks:
            pass
    assert response.status_code == 200, response.status_code
    return elapsed


def cursors(ws: Workspace, pages: list[int]) -> dict[int, str]:
    """The `after` key of each page (page p starts after the (p-1)*PAGE-th key)."""
    con = ws.connect()
    out = {}
    for p in pages:
        out[p] = "" if p == 1 else con.execute("select key from images order by key limit 1 offset $o",
                                              {"o": (p - 1) * PAGE - 1}).fetchone()[0]
    return out


def query_ms(index, page: int, after: str, filters: dict) -> tuple[float, float]:
    """(keyset, offset) milliseconds of one grid page as bare queries on the review table."""
    from review.selection import GRID_COLUMNS, Filters

    condition, params = index.check(Filters(**filters))
    columns = ", ".join(f'"{c}"' for c in GRID_COLUMNS)
    queries = [(f"select {columns} from review_rows where key > $after and ({condition}) order by key limit {PAGE}",
                {**params, "after": after}),
               (f"select {columns} from review_rows where {condition} order by key limit {PAGE} offset $o",
                {**params, "o": (page - 1) * PAGE})]
    out = []
    for sql, values in queries:
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            index.fresh().execute(sql, values).fetchall()
            times.append((time.perf_counter() - started) * 1000)
        out.append(statistics.median(times))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 images")
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    n = 100_000 if args.quick else args.images
    pages = [1, 100, 10_000] if n >= 10_000 * PAGE else [1, 100, max(2, n // PAGE // 2)]
    with tempfile.TemporaryDirectory(prefix="booruset-review-bench-") as tmp:
        started = time.perf_counter()
        ws = make_workspace(Path(tmp) / "ws", n)
        print(f"workspace: {n} images in {time.perf_counter() - started:.1f} s", flush=True)
        after = cursors(ws, pages)
        server, startup = start_server(Path(tmp) / "ws", args.port)
        print(f"server up in {startup:.1f} s (builds the review table)", flush=True)
        results = []
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120) as client:
                for fname, filters in FILTERS.items():
                    for page in pages:
                        params = {**filters, "after": after[page]}
                        first_byte_ms(client, "/", params)  # warm-up
                        grid = statistics.median(first_byte_ms(client, "/", params) for _ in range(REPEATS))
                        api = statistics.median(first_byte_ms(client, "/api/images", {**params, "limit": PAGE})
                                                for _ in range(REPEATS))
                        results.append((fname, page, grid, api))
                        print(f"page {page:>6} filter {fname:<9}: grid {grid:7.1f} ms, api {api:7.1f} ms", flush=True)
                key = after[pages[-1]]
                edit = [first_edit_ms(client, key, i) for i in range(REPEATS)]
                print(f"one edit (write, publish, refresh the image's row): {statistics.median(edit):.0f} ms")
        finally:
            server.terminate()
            server.wait(timeout=60)
        from review.selection import ReviewIndex

        index = ReviewIndex(ws)
        index.fresh()
        for fname, page, grid, api in results:
            worst = max(grid, api)
            keyset, offset = query_ms(index, page, after[page], FILTERS[fname])
            print(f"RESULT review_page_{page}_{fname}_first_byte ratio={GOAL_MS / worst:.2f} goal=1 "
                  f"met={'yes' if worst <= GOAL_MS else 'no'} ({worst:.1f} ms, goal {GOAL_MS:.0f} ms)")
            if page != pages[-1]:
                continue  # OFFSET costs little on the first pages: the comparison means something deep down
            print(f"RESULT review_page_{page}_{fname}_keyset_vs_offset ratio={offset / keyset:.2f} goal=1 "
                  f"met={'yes' if offset >= keyset else 'no'} "
                  f"(query {keyset:.1f} ms by key, {offset:.1f} ms by OFFSET)")


def first_edit_ms(client: httpx.Client, key: str, i: int) -> float:
    started = time.perf_counter()
    answer = client.post("/api/edits", json={"key": key, "add_tags": [f"bench_tag_{i}"]})
    assert answer.status_code == 200 and answer.json()["edits"] == 1, answer.text
    return (time.perf_counter() - started) * 1000


if __name__ == "__main__":
    main()
