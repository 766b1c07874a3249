"""What a request about one recording gives back, whichever front end asked (`infer`, the Python
API, `serve`): the text, its timed segments with their flags, and warnings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Segment:
    start: float
    end: float
    text: str
    flag: str | None = None  # None = decoded to its end; "budget" = cut at its token budget; "loop" = a repetition loop, one copy kept


@dataclass
class Result:
    path: str
    text: str = ""
    error: str | None = None
    audio_s: float = 0.0
    wall_s: float = 0.0
    rtf: float = 0.0  # audio seconds per wall second (higher is faster)
    segments: list[Segment] = field(default_factory=list)
    strategy: str | None = None  # instructions: the strategy that ran (direct | transcript); None for transcripts
    warnings: list[str] = field(default_factory=list)  # segments cut or looping, a transcript shortened to fit, no speech found
    transcript: str | None = None  # the transcript strategy: the transcript the answer was made from
    rounds: int = 0  # the transcript strategy: map-reduce rounds before the final answer (0 = it fitted the context)
    size: int | None = None  # the input file's size and mtime: what `infer --resume` matches on
    mtime_ns: int | None = None
    index: int = field(default=-1, repr=False)  # position among the inputs (not written out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("index")
        return d
