"""The Streamlit app's logic: one module per page, plus what the pages share. The only part of `kd`
that imports streamlit; the pages in `pages/` only lay out widgets and call in here.

- `state`: the folders in use (weights, runs, dataset), the session, messages shared by every page
- `models`: the teacher and student of the weights in use, loaded once per weights folder
- `figures`: plotly figures (training curves, ROC, calibration, confusion matrices, image sizes)
- `data`: the dataset's splits, counts, image sizes and examples (Data page; cases for the others)
- `diagnose`: one image through both models, remembered in the session, drawn as a case
- `train`, `progress`: the training form and its job, the live panel, the runs and the weights in use
- `evaluate`: the model card or a recomputed split, the threshold explorer, disagreements, faithfulness
"""
