"""Names of the methods the command line offers, whose implementations import heavy libraries.

Kept apart so that building the parser (``pneumoscope --help``) imports neither torch nor
pytorch-grad-cam. Each name is defined once, here; ``explain.CAM_METHODS`` and
``adapt.adapt_run`` are built on these names.
"""

# --method of explain: name -> the pytorch-grad-cam class that computes it
CAM_METHOD_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "eigencam": "EigenCAM"}

# --method of adapt (the first is the default). center: the site's feature means mapped onto the training split's;
# standardize: means and sds. +prior: probabilities moved to the site's estimated prevalence (decisions unchanged).
ADAPT_METHODS = ("center+prior", "center", "standardize+prior", "standardize")
# N classes: the class priors estimated without labels moved the probabilities the wrong way on the official test images
# (BENCHMARKS.md, "The three-class run at a new site"), so `adapt` centres the features only unless told otherwise.
MULTICLASS_ADAPT_METHOD = "center"
