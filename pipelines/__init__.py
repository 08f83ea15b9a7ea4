"""Data for MLO-MAE: datasets, the fixed D_tr / D_val / test split, and loaders."""
