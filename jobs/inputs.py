"""`booruset inputs`: the inputs a workspace holds, and forgetting one.

Inputs add up over runs: one that a run does not name keeps its rows, so a collection taken out
of a training set stayed in it (and in the balance, captions and export) for good. Forgetting an
input retires its ingest units as a run retires a changed shard's: their markers stay, marked
`forgotten` and naming no part, so the next publish drops its rows from the ingest tables; its
annotate units (one per ingest unit, same id) go too, so no model is re-run for the rest. Curate,
caption and export drop what they derived from it at their next run. The input keeps its id in
the registry: named again, it is ingested anew under the same keys.
"""

from __future__ import annotations

from collections import defaultdict

from jobs.config import Config, ConfigError
from jobs.export import gone_inputs
from jobs.ingest import REGISTRY, input_specs
from store.workspace import Workspace, WorkspaceError
from udfs.ingest.sources import input_location, resolve_inputs

INGEST, ANNOTATE = "ingest", "annotate"


def show(ws: Workspace) -> int:
    """Print one line per input: id, images, units, state (here, gone, forgotten), location."""
    registry = ws.read_json(REGISTRY) or {}
    if not registry:
        print("inputs: none (nothing ingested in this workspace)")
        return 0
    counts = input_counts(ws)
    gone = set(gone_inputs(registry))
    width = max(len(i) for i in registry.values())
    print(f"{'input':<{width}}  {'images':>9}  {'units':>6}  state      location")
    for location, input_id in sorted(registry.items(), key=lambda item: (item[1], item[0])):
        images, units, forgotten = counts.get(input_id, (0, 0, False))
        state = "forgotten" if forgotten and not units else "gone" if input_id in gone else "here"
        print(f"{input_id:<{width}}  {images:>9,}  {units:>6,}  {state:<9}  {location}")
    return 0


def input_counts(ws: Workspace) -> dict[str, tuple[int, int, bool]]:
    """{input id: (images, units, whether a unit of it was forgotten)} from the ingest markers."""
    images: dict[str, int] = defaultdict(int)
    units: dict[str, int] = defaultdict(int)
    forgotten: set[str] = set()
    for marker in ws.done_units(INGEST).values():
        input_id = marker.get("input")
        if marker.get("forgotten"):
            forgotten.add(input_id)
        elif not marker.get("retired"):
            images[input_id] += int(marker.get("images", 0))
            units[input_id] += 1
    return {i: (images[i], units[i], i in forgotten) for i in {*images, *units, *forgotten}}


def forget(cfg: Config, ws: Workspace, input_id: str) -> int:
    """Retire every unit of the input `input_id` (its rows go at the publish here) and print what
    went. The caller holds the workspace lock."""
    registry = ws.read_json(REGISTRY) or {}
    if input_id not in registry.values():
        known = ", ".join(sorted(set(registry.values()))) or "none"
        raise ConfigError(f"no input {input_id!r} in this workspace (its inputs: {known}; "
                          "`booruset inputs` lists them)")
    held = INGEST in ws.holds()
    if held and not ws.holds_by_input(INGEST):  # a hold of an earlier version: all inputs or none
        raise WorkspaceError("an ingest that was replacing units did not end: run ingest to its end first")
    markers = {uid: m for uid, m in ws.done_units(INGEST).items() if m.get("input") == input_id}
    again = bool(markers) and all(m.get("forgotten") for m in markers.values())
    # a forget killed after its last marker, before it ended its holds: readers still see the
    # input, and no ingest plans it again to end them; this forget goes on to its end
    stopped = input_id in ws.held_inputs(INGEST) or ws.held_inputs(ANNOTATE) == [input_id]
    if again and not stopped:  # it said "forgot b: 0 images of 3 units"
        print(f"inputs: {input_id} is forgotten already: nothing to do", flush=True)
        return 0
    images = sum(int(m.get("images", 0)) for m in markers.values() if not m.get("retired"))
    annotated = ws.done_units(ANNOTATE)
    # one marker at a time: a forget killed part way keeps the input whole for readers (and the
    # jobs after it) until a forget of it ends, as an ingest replacing units does
    ws.hold_publishing(INGEST, [input_id])
    # annotate's rows likewise; a hold a killed annotate run left is that run's to end
    hold_annotate = ANNOTATE not in ws.holds() or ws.held_inputs(ANNOTATE) == [input_id]
    if hold_annotate:
        ws.hold_publishing(ANNOTATE, [input_id])
    for uid in markers:
        ws.commit_unit(INGEST, uid, {"retired": True, "forgotten": True, "input": input_id}, parts={})
        if uid in annotated:
            ws.forget_unit(ANNOTATE, uid, hold=False)
    # batches a killed ingest finished of the input's units: dropped with their parts
    ws.pending_batches(INGEST, set(), elsewhere=lambda marker: marker.get("input") != input_id)
    # this input's units are all retired now; those of inputs a killed ingest was replacing stay held
    ws.release_hold(INGEST, {input_id})
    if hold_annotate:
        ws.release_hold(ANNOTATE)
    ws.publish()
    if again:
        print(f"inputs: {input_id} was forgotten by a forget that stopped before its end: its rows are gone now",
              flush=True)
        return 0
    print(f"inputs: forgot {input_id}: {images:,} images of {len(markers):,} units; their ingest and annotate rows "
          "are gone, and curate, caption and export drop what they derived from them at their next run "
          "(booruset run)", flush=True)
    for location in configured_locations(cfg, registry, input_id):
        print(f"inputs: ingest.inputs still names {location}: the next ingest reads it again", flush=True)
    return 0


def configured_locations(cfg: Config, registry: dict[str, str], input_id: str) -> list[str]:
    """The configured inputs that are the input `input_id` (those that resolve)."""
    try:
        specs = input_specs(cfg)
    except ConfigError:
        return []
    found = []
    for spec in specs:
        try:
            paths = resolve_inputs([spec])
        except (OSError, ValueError):  # not there (or unreachable): it reads nothing again
            continue
        found += [input_location(p) for p in paths if registry.get(input_location(p)) == input_id]
    return found
