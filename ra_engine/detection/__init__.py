"""One scan through the whole flow: model space, network, score, threshold, and the outputs on the scan's own grid."""
