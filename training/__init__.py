"""Training: the loop the two trainers share, the LRS2 datasets, and a run's checkpoint folder."""
