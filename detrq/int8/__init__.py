"""INT8 post-training quantization for CNN detectors (torchvision Faster R-CNN first) and CNN classifiers.

Modules: ``detector`` (the embedded Faster R-CNN and its checkpoint), ``stock`` (torchvision's stock Faster
R-CNNs with random weights and recalibrated BN), ``data`` (torchvision-style targets over the COCO-layout dataset),
``train`` (training it), ``detect`` (inference, mAP via the shared ``coco_metrics``, float-vs-int8 detection
errors), ``plan`` (which parts get int8, the traceable float copy, the backend interface), ``quantize`` (the one
entry point ``quantize_int8``) with FX-traceable RPN-head and box-predictor stand-ins in ``heads``, its backends
in ``backends`` (fx, pt2e) and ``onnx_export`` (onnxruntime, ONNX export and the ORT report), ``measure`` (size,
latency, peak memory), ``stages`` (per-stage time and output breakdown), ``activations`` and ``plots``
(float-vs-int8 activation maps) and ``workflow`` (the end-to-end run behind ``python -m detrq int8`` and the
notebook). A user's ONNX detector (``python -m detrq int8 --onnx``): ``onnx_workflow`` (the run) over
``onnx_model`` (the file, its image input, sessions, profile), ``calibration`` (images and their preprocessing),
``onnx_layers`` (per-conv float-vs-int8 from onnxruntime's intermediate outputs),
``onnx_quantize`` (``quantize_static`` with the decoding tail left float) and ``yolo_decode`` (``[batch, 4 +
classes, anchors]`` outputs with NMS); ``yolo`` (a YOLOv8-architecture model) and ``onnx_stock`` (stock one-stage
detectors exported to ONNX) give the files its tests and docs rows use.
"""
