"""The names of the scores (torch-free, for model cards and the command line): the pixel-level anomaly map's kinds
and the image-level scores built from it (docs/METHOD.md, "Inference and anomaly score")."""

# What the anomaly map of a pixel is.
SCORE_KINDS = {
    "full": "A = |CLAHE(x_ph) - CLAHE(x)| * S1 * S2 (docs/METHOD.md)",
    "l1": "|x - x_ph| (the plain reconstruction error, no CLAHE, LPIPS or blur; ablation)",
}

# What a slice's and a whole scan's score is (the model card's `image_score`), each a mean inside the brain/body
# mask of the model-space slices.
IMAGE_SCORES = {
    "mean_a": "the mean of the anomaly map A (the paper's)",
    "l1": "the mean of the reconstruction error |x - x_ph| in the model space",
    "mse": "the mean of the squared reconstruction error (x - x_ph)^2 in the model space",
}
