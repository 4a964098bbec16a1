"""detrq: output sensitivity-aware mixed-precision PTQ of DETR, and INT8 PTQ of CNN detectors, reproducibly.

The package by concept, top layer first; a folder imports only folders on layers below it (tests/test_architecture.py
checks this and that there is no import cycle):

    cli                                   python -m detrq <command>: thin wrappers over what is below
    artifact                              the paper's cached steps (pipeline), Table 1, Pareto/Table 2, figures,
                                          notebooks runner, README/docs generator, reproduction report
    sensitivity  training  int8           per-layer metrics, Eq. (5), measured costs and their check |
                                          training the mini DETR | INT8 PTQ of CNN detectors
    evaluation                            COCO mAP, paired bootstrap
    models  data  quant                   DETR (official layout) and loading | COCO data, synthetic set, validator |
                                          Eq. (6) and other quantizers, bit maps, packing, the ILP
    parallel                              torchrun ranks, the launcher, and worker processes for jobs side by side
    io                                    results I/O, results layout, cache keys, locks, errors, paths
"""
