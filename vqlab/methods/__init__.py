"""The papers' quantizers, one module each, plugged in through the seam (`vqlab.quantized.WeightCode` +
a config registered with `vqlab.register_handler`): import a module to register its configs.

    gong     Gong et al. 2014: binarization, scalar k-means, product and residual quantization
    lattice  Choi et al.: universal randomized (dithered) lattice quantization with universal source coding
    vq4all   VQ4ALL: one KDE-sampled universal codebook for several networks, progressive candidate assignment
    qaf      quantization-aware CP factorization (ADMM with a b-bit grid constraint) vs CP-ALS + PTQ
"""
