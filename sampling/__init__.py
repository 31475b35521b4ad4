"""Everything around sampling that is not the model, used by sample.py, edit.py and evaluate.py.

    model_flags  the model-loading flags of every script that loads a VAR, and the loading itself
    draw         class-conditional images as uint8, each image with its own seeded generator
    fid_export   the resumable, distributed 50,000-image export (manifest, chunk plan, PNGs, .npz)
    image_sets   PNG folders and OpenAI-format .npz files, read and written in batches
    rejection    classifier rejection sampling (best of K candidates)
    editing      zero-shot in-painting, out-painting and class-conditional editing
    metrics      Inception features, FID, Inception Score, precision/recall
    cli          how the scripts report a user's mistake (a message, exit code 2)

Importing this package imports none of its modules and changes no global state.
"""
