"""Figures: matplotlib drawings of one run (its trajectory, the paper's Figure 1; image grids,
Figure 3) and of many (the information plane, Figure 2; KL and RMSE curves, Figure 4). They read
records and GECO's typed state, never the training loop, so training and evaluation both use them;
matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from geco_core.figures.run import as_displayable, plot_trajectory, pyplot, save_figure, save_grid, save_grids
from geco_core.figures.runs import plot_curves, plot_information_plane

__all__ = [
    "plot_trajectory",
    "save_grid",
    "save_grids",
    "as_displayable",
    "pyplot",
    "save_figure",
    "plot_curves",
    "plot_information_plane",
]
