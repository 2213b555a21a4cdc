"""The course's exercises, each with its expected value computed from the notebook's numbers.

An exercise cell passes the numbers its answer is made from (`bandwidth=bw`), never the formula
or the value, so a learner who has not worked it out cannot read it off the cell. Keys are
"NN.name", NN the notebook. `helpers.exercises` holds the checking (hints, tolerances, units);
the exercises themselves are in `workbook_one_device` (notebooks 00–02) and `workbook_serving`
(03–06), imported here so that every key is in the bank when a notebook calls
`workbook.answer / predict / derive / investigate`.
"""

from __future__ import annotations

from helpers import workbook_one_device, workbook_serving
from helpers.exercises import BANK, answer, derive, investigate, predict

__all__ = ["BANK", "answer", "derive", "investigate", "predict"]
SECTIONS = (workbook_one_device, workbook_serving)
