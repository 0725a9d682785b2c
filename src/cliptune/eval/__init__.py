"""Evaluation: every configured retrieval and zero-shot set, read once and scored on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

from cliptune.config import EvalConfig
from cliptune.data import CaptionTable, LabelledImages, read_caption_table, read_classification
from cliptune.eval.encode import Encoding
from cliptune.eval.retrieval import evaluate_retrieval
from cliptune.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier


@dataclass
class EvalSuite:
    """The eval sets of a run, read (and their images checked) before training starts."""

    retrieval: list[CaptionTable] = field(default_factory=list)
    zeroshot: list[tuple[LabelledImages, list[str]]] = field(default_factory=list)
    batch_size: int = 64

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> EvalSuite:
        return cls(
            retrieval=[read_caption_table(spec) for spec in cfg.retrieval],
            zeroshot=[(read_classification(spec), spec.templates) for spec in cfg.zeroshot],
            batch_size=cfg.batch_size,
        )

    def __bool__(self) -> bool:
        return bool(self.retrieval or self.zeroshot)

    def run(self, encoding: Encoding) -> dict[str, dict[str, float]]:
        results = {}
        for table in self.retrieval:
            results[table.name] = evaluate_retrieval(encoding, table)
        for data, templates in self.zeroshot:
            results[data.name] = evaluate_zeroshot(encoding, data, templates)
        return results


__all__ = ["Encoding", "EvalSuite", "evaluate_retrieval", "evaluate_zeroshot", "zeroshot_classifier"]
