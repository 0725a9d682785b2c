"""Evaluation: every configured retrieval and zero-shot set, read once and scored on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cliptune.config import CompositionalitySpec, EvalConfig
from cliptune.data import CaptionTable, LabelledImages, read_caption_table, read_classification
from cliptune.eval.retrieval import evaluate_retrieval
from cliptune.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier
from cliptune.features.encoding import Encoding

logger = logging.getLogger("cliptune.eval")

if TYPE_CHECKING:  # the compositionality module is imported only by runs that have such a set
    from cliptune.eval.compositionality import CompositionalityTable


@dataclass
class EvalSuite:
    """The eval sets of a run, read (and their images checked) before training starts."""

    retrieval: list[CaptionTable] = field(default_factory=list)
    zeroshot: list[tuple[LabelledImages, list[str]]] = field(default_factory=list)
    compositionality: list[CompositionalityTable] = field(default_factory=list)
    batch_size: int = 64

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> EvalSuite:
        suite = cls(
            retrieval=[read_caption_table(spec) for spec in cfg.retrieval],
            zeroshot=[(read_classification(spec), spec.templates) for spec in cfg.zeroshot],
            compositionality=[compositionality_table(spec) for spec in cfg.compositionality],
            batch_size=cfg.batch_size,
        )
        suite.warn_degenerate()
        return suite

    def warn_degenerate(self) -> None:
        """Name the sets whose scores mean nothing: one image (every recall is 100) or one class (accuracy is 100)."""
        for table in self.retrieval:
            if len(table.images) < 2:
                logger.warning(
                    "eval.retrieval %s: %d usable image; its recall is 100 whatever the model",
                    table.name,
                    len(table.images),
                )
        for data, _ in self.zeroshot:
            if len(set(data.labels)) < 2:
                logger.warning(
                    "eval.zeroshot %s: images of %d class; its accuracy is 100 whatever the model",
                    data.name,
                    len(set(data.labels)),
                )

    def __bool__(self) -> bool:
        return bool(self.retrieval or self.zeroshot or self.compositionality)

    def run(self, encoding: Encoding, loss_batch: int | None = None) -> dict[str, dict[str, float]]:
        """Every set's metrics; with `loss_batch`, retrieval sets also report `loss` (see `validation_loss`)."""
        results = {}
        for table in self.retrieval:
            results[table.name] = evaluate_retrieval(encoding, table, loss_batch)
        for data, templates in self.zeroshot:
            results[data.name] = evaluate_zeroshot(encoding, data, templates)
        if self.compositionality:
            from cliptune.eval.compositionality import evaluate_compositionality

            for comp in self.compositionality:
                results[comp.name] = evaluate_compositionality(encoding, comp)
        return results


def compositionality_table(spec: CompositionalitySpec) -> CompositionalityTable:
    from cliptune.eval.compositionality import read_compositionality_table

    table = read_compositionality_table(
        spec.path, spec.image_key, spec.caption_key, spec.negatives_key, root=spec.images_root
    )
    table.name = spec.name
    return table


__all__ = [
    "Encoding",
    "EvalSuite",
    "compositionality_table",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "zeroshot_classifier",
]
