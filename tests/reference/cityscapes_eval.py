"""The Cityscapes evaluation scripts (PyPI cityscapesscripts) on a Cityscapes-layout val set and
a folder of label-id predictions, for tests/train.rs: prints one JSON line with the mIoU and the
IoU per class, as `evalPixelLevelSemanticLabeling` computes them (one confusion matrix over
the set; ignoreInEval classes left out; a class absent from labels and predictions is NaN).

usage: cityscapes_eval.py CITYSCAPES_ROOT PREDICTIONS_DIR
"""
import glob
import json
import math
import os
import sys

from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as evaluation


def main():
    root, predictions = sys.argv[1], sys.argv[2]
    ground_truth = sorted(glob.glob(os.path.join(root, "gtFine", "val", "*", "*_gtFine_labelIds.png")))
    predicted = [os.path.join(predictions, os.path.basename(g).replace("_gtFine_labelIds.png", "_labelIds.png"))
                 for g in ground_truth]
    args = evaluation.args
    args.evalInstLevelScore = False  # iIoU needs instance maps; the mIoU does not
    args.JSONOutput = False
    args.quiet = True
    results = evaluation.evaluateImgLists(predicted, ground_truth, args)
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    print(json.dumps({"miou": clean(results["averageScoreClasses"]),
                      "classes": {k: clean(v) for k, v in results["classScores"].items()}}))


if __name__ == "__main__":
    main()
