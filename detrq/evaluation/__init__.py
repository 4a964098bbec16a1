"""Scoring detections: inference plus pycocotools COCOeval, and the paired bootstrap over images."""
