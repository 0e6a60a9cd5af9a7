"""Streams of test images: scenarios (which image when, under which shift: noise or a corrupted set's
corruption and severity) and the online-accuracy evaluation of :func:`bnadapt.adapt.stream_adapt`
against standard inference and per-batch adaptation (docs/stream.md)."""

from bnadapt.stream.evaluate import (DEFAULT_BATCH_SIZES, DEFAULT_ESTIMATORS, format_length_table,
                                     format_stream_table, lengths_grid, online_slices, stream_correct,
                                     stream_evaluation, stream_then_freeze_on)
from bnadapt.stream.scenarios import (NEEDS_LABELS, SCENARIOS, CorruptedSource, Stream, apply_domain,
                                      check_corruption_domain, check_scenario, clean_images, corrupted_source,
                                      dataset_labels, make_stream, parse_corruption_list, run_lengths,
                                      stream_batches, unit_noise)

__all__ = [
    "DEFAULT_BATCH_SIZES", "DEFAULT_ESTIMATORS", "NEEDS_LABELS", "SCENARIOS", "CorruptedSource", "Stream",
    "apply_domain", "check_corruption_domain", "check_scenario", "clean_images", "corrupted_source",
    "dataset_labels", "format_length_table", "format_stream_table", "lengths_grid", "make_stream", "online_slices",
    "parse_corruption_list", "run_lengths", "stream_batches", "stream_correct", "stream_evaluation",
    "stream_then_freeze_on", "unit_noise",
]
