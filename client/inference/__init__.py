"""Site-side inference: a trained model applied to images, videos and live cameras at the bedside.

    model.py     which model to use (resolve_model) and the runtimes that run it (PyTorch, ONNX Runtime)
    pipeline.py  one frame: decode -> detect -> align (client.data.preprocess) -> standardise -> classify
    media.py     reading images and videos so that an unreadable or cut-short file is one named error
    tracking.py  IoU face tracks across frames and temporal smoothing of their probabilities
    alerts.py    care-alert rules (TOML) evaluated on the smoothed stream, JSON events, local hook command
    export.py    ONNX export (dynamic batch) and int8 quantisation for IoT devices
    adapt.py     a personal head per patient fitted on a carer's corrections, kept apart from the federated weights

Nothing here talks to the network: frames come from files, a local camera or a stream URL the user names, and
results go to stdout and files the user names.
"""
