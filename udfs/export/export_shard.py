"""One export unit (one source of `images`): read its images once, write every layout, commit.

A planning task made the unit's plan (which sample goes to which shard, names, sizes, txt and
json: udfs/export/export_plan.py); this task reads the source with udfs.ingest.sources.read_unit,
resizes where planned, and writes:
- webdataset: its planned shards `shard-%06d.tar` (WebDataset members KEY.ext, fixed mtime);
- kohya: `<repeats>_<concept>/<name>.<ext>` + `<name>.txt`;
- everydream: `<folder>/<name>.<ext>` + `.txt`, and `multiply.txt` per folder;
- parquet: `train-%06d.parquet` (same index as the shard) with Hugging Face `datasets` features.
Every file is written to a temporary name and renamed; the unit's manifest and errors parts go
to the workspace and its marker is committed last, so a killed unit is redone whole.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store.workspace import Workspace, fault_point
from udfs.export.export_plan import placed, read_plan
from udfs.export.resize import resize_image
from udfs.export.safe_names import inside
from udfs.source_members import source_members

JOB = "export"
LAYOUT_DIRS = {"webdataset": "webdataset", "kohya": "kohya", "everydream": "everydream", "parquet": "parquet"}
FOLDER_LAYOUTS = ("kohya", "everydream")  # a file per image and its KEY.txt, in concept folders
STARTED = f"{JOB}/started"  # state/export/started/<unit>.json: the files of a unit not yet committed


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def parquet_name(index: int) -> str:
    return f"train-{index:06d}.parquet"


def export_unit(item: dict[str, Any], workspace: str, out: str, options: dict) -> dict:
    """Ray task: export one unit (its plan read from the plan file its planning task wrote,
    shards moved to their global numbers) and commit it; returns the unit's info."""
    check_out_is_shared(out, options["out_check"])
    ws = Workspace(workspace)
    offset, shards = int(item["offset"]), int(item["shards"])
    plan = {"unit": item["unit"], "source": item["source"],
            "shards": list(range(offset, offset + shards)), "samples": placed(read_plan(ws, item["path"]), offset)}
    # before the first file: a unit killed before its commit is named by no marker and no
    # manifest, and a rerun with another plan would leave its files where trainers read them
    # (the folder of these records is made once, by the driver: jobs/export.remove_unfinished)
    files = planned_files(plan, options["layouts"])
    ws.write_json(f"state/{STARTED}/{plan['unit']}.json", {"out": out, "files": files})
    info = {**UnitExport(ws, out, plan, options).run(), "offset": offset}  # where its shards are: export_moves
    ws.commit_unit(JOB, plan["unit"], info,
                   parts={"export_manifest": [plan["unit"]], "errors": [f"export-{plan['unit']}"]})
    ws.forget_unit(STARTED, plan["unit"], hold=False)
    return info


def planned_files(plan: dict, layouts: list[str]) -> list[str]:
    """Every file of the export folder a unit may write: its shards and Parquet files, and its
    images' kohya and EveryDream files (not multiply.txt: other units' images share it)."""
    files = [f"{layout}/{name(index)}" for layout, name in (("webdataset", shard_name), ("parquet", parquet_name))
             if layout in layouts for index in plan["shards"]]
    for sample in plan["samples"]:
        for layout in FOLDER_LAYOUTS:
            if layout in layouts:
                folder = f"{layout}/{sample[layout]}"
                files += [f"{folder}/{sample['name']}.{sample['ext']}", f"{folder}/{sample['name']}.txt"]
    return files


OUT_CHECK = ".booruset-export-check"
OUT_CHECK_TRIES = 5


def check_out_is_shared(out: str, token: str) -> None:
    """RuntimeError unless `out` holds the check file the driver wrote there for this run: on a
    cluster, export.out must be one folder that every node mounts at the same path (the driver
    writes the wids index and removes stale files there; each task writes its shards there)."""
    check = os.path.join(out, OUT_CHECK)
    for attempt in range(OUT_CHECK_TRIES):  # NFS and FUSE mounts cache a name's absence for seconds
        if attempt:
            time.sleep(1.0)
            if os.path.isdir(out):
                os.listdir(out)  # a listing refreshes an NFS client's view of the folder
        try:
            with open(check) as f:
                if f.read() == token:
                    return
        except OSError:
            pass
    raise RuntimeError(f"export.out {out} is not the driver's folder on node {os.uname().nodename}: on a cluster it "
                       "must be shared storage mounted at the same path on every node")


def parquet_schema() -> pa.Schema:
    """The Parquet layout's schema, with the Hugging Face `datasets` features in its metadata
    (so `load_dataset("parquet", ...)` gives an Image column); built by `datasets` itself."""
    from datasets import Features, Image, Sequence, Value

    return Features({
        "key": Value("string"), "image": Image(), "text": Value("string"), "tags": Sequence(Value("string")),
        "characters": Sequence(Value("string")), "multiply": Value("float64"), "repeats": Value("int32"),
        "json": Value("string"),
    }).arrow_schema


class ShardTar:
    """One output shard: members `<key>.<ext>` in sample order, fixed mtime, owner root.

    Each header is tarfile's (TarInfo.tobuf, PAX format), built here for the names a plain ustar
    header holds (member_header: the same bytes); the framing around it is written here: the
    member's bytes straight after its header, zeros to the next 512-byte block, and two zero blocks
    and zeros to a 10 KiB record at the end (POSIX ustar, as tarfile writes it: the bytes are the
    same). webdataset.TarWriter opens tarfile in stream mode and copies each member
    in 8 KB pieces, and tarfile.addfile reads the member from a file object (a copy of each image
    through BytesIO) and copies its TarInfo: this writer takes 25% less CPU than tarfile.addfile
    with 1 MiB pieces (bench/export.py measures the export against that loop).
    """

    def __init__(self, path: str) -> None:
        self.stream = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.written = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            header = member_header(f"{key}.{ext}", len(data))
            padding = -len(data) % tarfile.BLOCKSIZE
            self.stream.write(header)
            self.stream.write(data)
            self.stream.write(tarfile.NUL * padding)
            self.written += len(header) + len(data) + padding

    def close(self) -> None:
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.written + end) % tarfile.RECORDSIZE
        self.stream.write(tarfile.NUL * end)
        self.stream.close()


# The fixed fields of a shard member's ustar header (mode 0o444, uid and gid 0, mtime 0, a
# regular file, no link, magic "ustar\0" "00", no owner names, device numbers nor prefix), either
# side of the name, size and checksum.
USTAR_IDS = b"0000444\x000000000\x000000000\x00"
USTAR_MTIME = b"00000000000\x00"
USTAR_TAIL = (b"0" + tarfile.NUL * 100 + tarfile.POSIX_MAGIC + tarfile.NUL * (32 + 32 + 8 + 8 + 155)).ljust(
    tarfile.BLOCKSIZE - 156, tarfile.NUL)
USTAR_TAIL_SUM = sum(USTAR_TAIL) + 8 * ord(" ")  # the checksum field counts as 8 spaces
USTAR_MAX_SIZE = 8 ** 11  # an 11-digit octal size; larger ones take a PAX header


def member_header(name: str, size: int) -> bytes:
    """The header tarfile's TarInfo.tobuf (PAX format) gives a shard member (mode 0o444, mtime
    0): ustar_header where one ustar block holds it, else tarfile's (PAX records first)."""
    if name.isascii() and len(name) <= tarfile.LENGTH_NAME and 0 <= size < USTAR_MAX_SIZE:
        return ustar_header(name.encode("ascii"), size)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def ustar_header(name: bytes, size: int) -> bytes:
    """One ustar block for an ASCII name of at most 100 bytes and a size under 8 GiB: the bytes
    tarfile builds for it, in a fifth of the time (its TarInfo.tobuf was ~20 ms of a unit's
    ~125 ms: 300 members)."""
    head = name.ljust(tarfile.LENGTH_NAME, tarfile.NUL) + USTAR_IDS + b"%011o\x00" % size + USTAR_MTIME
    return head + b"%06o\x00 " % (sum(head) + USTAR_TAIL_SUM) + USTAR_TAIL


class ParquetShard:
    """One output Parquet file of the parquet layout, written a row group at a time: a unit's
    memory holds at most ROW_GROUP_BYTES of image bytes, not a whole shard's (max_bytes, 1 GB
    by default, and copies of it when the table was built and encoded at the end)."""

    ROW_GROUP_BYTES = 64 << 20

    def __init__(self, path: str) -> None:
        self.path = path
        self.writer = pq.ParquetWriter(path, parquet_schema(), compression="zstd")
        self.rows: list[dict] = []
        self.bytes = 0

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.bytes += len(row["image"]["bytes"])
        if self.bytes >= self.ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.writer.schema))
        self.rows, self.bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def empty_text_layouts(layouts) -> tuple[list[str], bool]:
    """Where a sample with no text goes (UnitExport.written_anywhere; the review page's preview
    says the same): the folder layouts of `layouts` that leave it out, and whether another layout
    (shards, Parquet) still writes it."""
    return ([layout for layout in FOLDER_LAYOUTS if layout in layouts],
            any(layout not in FOLDER_LAYOUTS for layout in layouts))


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class UnitExport:
    """The writes of one unit; samples arrive in the source's own order."""

    def __init__(self, ws: Workspace, out: str, plan: dict, options: dict) -> None:
        self.ws, self.out, self.plan, self.options = ws, out, plan, options
        self.layouts = options["layouts"]
        self.shards: dict[int, tuple[str, ShardTar]] = {}
        self.parquets: dict[int, tuple[str, ParquetShard]] = {}
        self.manifest: list[dict] = []
        self.errors: list[dict] = []
        self.files: list[str] = []
        # size and modification time of each shard written: a later run takes the unit as done
        # only while they match (another workspace's export to the same folder writes shards of
        # the same names, often of the same size: tar pads to 10 KiB)
        self.stamps: dict[str, list[int]] = {}
        self.bytes_out = 0

    def run(self) -> dict:
        started = time.perf_counter()
        samples = {s["member"]: s for s in self.plan["samples"] if self.written_anywhere(s)}
        seen: set[str] = set()
        try:
            wanted = {member: sample.get("offset") for member, sample in samples.items()}
            sizes = {member: sample["bytes"] for member, sample in samples.items() if sample.get("bytes") is not None}
            for name, data in source_members(self.plan["source"], wanted, int(self.options["max_member_bytes"]),
                                             sizes):
                if name not in seen:  # the first of repeated names, as ingest took it
                    seen.add(name)
                    self.export_sample(samples[name], data)
            for member in sorted(set(samples) - seen):
                self.error(samples[member], "missing_member", "member not found in its source, or not of the size "
                                                              "ingest saw (moved or rewritten since ingest?)")
            self.finish()
        finally:
            self.abort_open_shards()
        return self.info(time.perf_counter() - started)

    # ---- one sample ---------------------------------------------------------------------
    def written_anywhere(self, sample: dict) -> bool:
        """Whether the sample is written to any layout. One with no text (no caption, and no tag
        past the tag rules) is left out of the kohya and EveryDream folders, with an errors row:
        kohya refuses an empty caption file, and EveryDream would caption the image with its file
        name. Shards and Parquet files take it (a trainer's caption dropout wants such samples);
        it is dropped when the export has no other layout."""
        folders, elsewhere = empty_text_layouts(self.layouts)
        if sample["txt"] or not folders:
            return True
        why = "no tag left by the export's tag rules (export.text = 'tags')" \
            if self.options.get("text") == "tags" else "no caption, and no tag left by the export's tag rules"
        message = (f"no text to write: {why}; left out of "
                   f"{' and '.join(folders)} (kohya refuses an empty caption file, EveryDream would caption the "
                   "image with its file name)")
        self.error(sample, "empty_text", message, dropped=not elsewhere)
        return elsewhere

    def export_sample(self, sample: dict, data: bytes) -> None:
        try:
            image = data if not sample["reencode"] else resize_image(
                data, tuple(sample["size"]), sample["ext"], int(self.options["jpeg_quality"]), bool(sample["crop"]),
                int(self.options["png_compress_level"]), sample.get("background", ""))
        except Exception as exc:  # any decoder or encoder failure: an errors row, the run goes on
            self.error(sample, "resize_failed", f"{type(exc).__name__}: {exc}")
            return
        ext, txt, meta = sample["ext"], sample["txt"], sample["json"]
        for warning in sample.get("text_warnings", []):  # exported all the same (export_plan.text_warnings)
            self.error(sample, warning["kind"], warning["message"], dropped=False)
        for copy in sample["copies"]:
            if "webdataset" in self.layouts:
                writer = self.shard_writer(copy["shard"])
                writer.write(copy["name"], {ext: image, "txt": txt.encode(), "json": meta.encode()})
                self.record(sample, copy["name"], "webdataset", f"webdataset/{shard_name(copy['shard'])}",
                            f"{copy['name']}.{ext}", image)
            if "parquet" in self.layouts:
                self.parquet_writer(copy["shard"]).write(self.parquet_row(sample, copy["name"], image))
                self.record(sample, copy["name"], "parquet", f"parquet/{parquet_name(copy['shard'])}",
                            f"{copy['name']}.{ext}", image)
        name = sample["name"]
        for layout in FOLDER_LAYOUTS:
            if layout in self.layouts and txt:
                folder = f"{layout}/{sample[layout]}"
                self.write_file(f"{folder}/{name}.{ext}", image)
                self.write_file(f"{folder}/{name}.txt", txt.encode())
                if layout == "everydream":
                    self.write_file(f"{folder}/multiply.txt", f"{sample['multiply']:g}\n".encode(), listed=True)
                self.record(sample, name, layout, folder, f"{name}.{ext}", image)

    def parquet_row(self, sample: dict, name: str, image: bytes) -> dict:
        meta = json.loads(sample["json"])
        return {"key": name, "image": {"bytes": image, "path": f"{name}.{sample['ext']}"}, "text": sample["txt"],
                "tags": meta["tags"], "characters": meta["characters"], "multiply": float(sample["multiply"]),
                "repeats": int(sample["repeats"]), "json": sample["json"]}

    def record(self, sample: dict, name: str, layout: str, path: str, image_name: str, image: bytes) -> None:
        self.bytes_out += len(image)
        self.manifest.append({
            "key": sample["key"], "clip": sample.get("clip"), "frame_time": frame_time(sample),
            "sample_key": name, "layout": layout, "path": path,
            "image": image_name,
            "width": sample["size"][0], "height": sample["size"][1], "image_bytes": len(image),
            "reencoded": bool(sample["reencode"]), "orientation": int(sample["orientation"]),
            "multiply": float(sample["multiply"]), "repeats": int(sample["repeats"]),
            "text_cut": int(sample.get("text_cut", 0)), "unit": self.plan["unit"]})

    def error(self, sample: dict, kind: str, message: str, dropped: bool = True) -> None:
        self.errors.append({"key": sample["key"], "source": self.plan["source"], "member": sample["member"],
                            "stage": JOB, "kind": kind, "message": message, "dropped": dropped})

    # ---- files --------------------------------------------------------------------------
    def write_file(self, relative: str, data: bytes, listed: bool = False) -> None:
        """Write a file of the export atomically. `listed`: the unit's marker names it (a Parquet
        file, a folder's multiply.txt); a per-image file (kohya and EveryDream images and .txt)
        is named by its manifest row instead, so that a marker stays small at any unit size."""
        atomic_write(inside(self.out, relative), data)
        fault_point("BOORUSET_KILL_AFTER_EXPORT_FILES")
        if listed:
            self.files.append(relative)

    def temp_path(self, relative: str) -> str:
        """A temporary name beside the export's file `relative`, renamed to it by finish()."""
        final = inside(self.out, relative)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        return f"{os.path.dirname(final)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(final)}"

    def shard_writer(self, index: int) -> ShardTar:
        if index not in self.shards:
            tmp = self.temp_path(f"webdataset/{shard_name(index)}")
            self.shards[index] = (tmp, ShardTar(tmp))
        return self.shards[index][1]

    def parquet_writer(self, index: int) -> ParquetShard:
        if index not in self.parquets:
            tmp = self.temp_path(f"parquet/{parquet_name(index)}")
            self.parquets[index] = (tmp, ParquetShard(tmp))
        return self.parquets[index][1]

    def finish(self) -> None:
        for index in self.plan["shards"]:  # a planned shard whose samples all failed is still there, empty
            if "webdataset" in self.layouts:
                self.shard_writer(index)
            if "parquet" in self.layouts:
                self.parquet_writer(index)
        layouts = (("webdataset", self.shards, shard_name), ("parquet", self.parquets, parquet_name))
        for layout, writers, name in layouts:
            for index, (tmp, writer) in sorted(writers.items()):
                writer.close()
                path = inside(self.out, f"{layout}/{name(index)}")
                os.replace(tmp, path)
                self.files.append(f"{layout}/{name(index)}")
                self.stamps[f"{layout}/{name(index)}"] = file_stamp(path)
            writers.clear()
        unit = self.plan["unit"]
        self.ws.write_part("export_manifest", unit, self.manifest)
        self.ws.write_part("errors", f"export-{unit}", self.errors)

    def abort_open_shards(self) -> None:
        for tmp, writer in [*self.shards.values(), *self.parquets.values()]:
            try:
                writer.stream.close() if isinstance(writer, ShardTar) else writer.writer.close()
            except Exception:  # noqa: BLE001, S110 - a full disk fails the close too; the file goes anyway
                pass
            if os.path.exists(tmp):
                os.remove(tmp)

    def info(self, seconds: float) -> dict:
        kinds = Counter(e["kind"] for e in self.errors)
        exported = len({m["key"] for m in self.manifest})
        return {"images": len(self.plan["samples"]), "exported": exported,
                "dropped": sum(e["dropped"] for e in self.errors),
                "error_kinds": dict(kinds), "bytes": self.bytes_out, "seconds": seconds,
                "files": sorted(set(self.files)), "out": self.out,
                "stamps": self.stamps,
                "samples_written": len(self.manifest)}


def frame_time(sample: dict) -> float | None:
    """A frame's time in its clip, from the sample's json (not a field of the plan: one there
    would change every unit's digest, and so write every export again)."""
    return json.loads(sample["json"]).get("frame_time") if sample.get("clip") else None


def file_stamp(path: str) -> list[int]:
    """[bytes, modification time in ns] of a written file: what says it is still the one written."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]
