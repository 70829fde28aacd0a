"""`retention_cells`: the one renderer of R[t][i], behind `retention_table`, the campaign report and the model card."""

from __future__ import annotations

import math

from peft_selective.evaluation.preference import retention_cells, retention_table


R = [[0.8, None], [0.7, 0.9]]
CI = [[[0.7, 0.9], None], [[0.6, 0.8], [0.85, 0.95]]]


def test_cells_with_intervals_and_bold_diagonal():
    assert retention_cells(R, CI, unreached="") == [
        ["**0.800** [0.700, 0.900]", ""],
        ["0.700 [0.600, 0.800]", "**0.900** [0.850, 0.950]"],
    ]
    # the campaign report's style: no bold, nothing for a cell not measured
    assert retention_cells(R, CI, bold_diagonal=False, missing="") == [
        ["0.800 [0.700, 0.900]", ""],
        ["0.700 [0.600, 0.800]", "0.900 [0.850, 0.950]"],
    ]
    # a score measured before the month trained is shown unless `unreached` is given
    assert retention_cells([[0.5, 0.3], [0.4, math.nan]], digits=2) == [["**0.50**", "0.30"], ["0.40", "–"]]
    assert retention_cells([[0.5, 0.3], [0.4, 0.6]], unreached="")[0] == ["**0.500**", ""]


def test_table_uses_the_cells():
    table = retention_table([[0.5, 0.3], [0.4, 0.6]], names=["x", "y"])
    assert "| x | **0.500** | 0.300 |\n| y | 0.400 | **0.600** |" in table
