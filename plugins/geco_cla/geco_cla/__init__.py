"""CLA, the classification-accuracy constraint of GECO (Table 1 of the paper)::

    form = "log" (default):   C = log kappa - log p_c(true class of x | x_hat)     per example, <= 0 when met
    form = "probability":     C = kappa - p_c(true class of x | x_hat)             (the paper's)

c is a frozen convolutional MNIST classifier (``network.py``), by default one trained to be robust to
small perturbations in the L2 norm (``robust.py``), whose gradients point towards what people read
as the digit:
the reconstruction must still be recognised as the right digit with probability at least kappa.
Summaries and ``geco eval`` also report the constraint under judges that did not shape the
reconstructions (:meth:`ClassifierAccuracy.judges`: the twin and the classifiers of the other
recipe). The paper's table prints ``l(x)^T c(g(z)) - kappa``, which would be satisfied by *failing*
to classify; the sign here is the one that makes it a ``<= 0`` constraint.

Why the log form is the default: p saturates, so where a reconstruction is not yet recognisable
(p near 0) the paper's form has almost no gradient and no multiplier can rescue it; ``-log p`` (the
classifier's cross-entropy) keeps a gradient of ``1 - p`` on the true logit. kappa stays a
probability: the batch mean of the log form is ``<= 0`` when the geometric mean of p is at least
kappa, which implies that the arithmetic mean is too. ``reached`` reports that geometric mean.

Scales (for GECO's controllers): log form ``value_scale = -log kappa`` (the way to certainty) and
``multiplier_scale = 1 / value_scale`` (a change of the constraint by its whole way to certainty is
worth one nat of KL); probability form ``value_scale = 1 - kappa`` and ``multiplier_scale = 1 /
(1 - kappa)``, the same rule.

The true class comes from the batch's labels, or, where the data has none (or ``use_labels=False``),
from the classifier's own prediction on the target. Images with C channels of stacked digits
(Color-MNIST, MNIST-triplets) are classified channel by channel: C components, one multiplier each.
The classifier is in eval mode and gets no gradient, but gradients flow through it to x_hat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geco_cla.network import DigitClassifier, DigitFeatures, load_classifier
from geco_core import Batch, ConfigError, Constraint, check_kappa, check_same_shape, freeze, hookimpl

__all__ = ["ClassifierAccuracy", "DigitClassifier", "DigitFeatures", "load_classifier"]

FORMS = ("log", "probability")
#: the shipped classifiers in pairs of a network and its twin (the same recipe, seed 1): the default
#: robust pair first, the standard pair last
PAIRS = (("shipped", "twin"), ("linf", "linf-twin"), ("standard", "standard-twin"))
TWINS = {a: b for pair in PAIRS for a, b in (pair, pair[::-1])}
#: the names judges go by
JUDGE_NAMES = {
    "shipped": "robust",
    "twin": "robust twin",
    "linf": "L-inf robust",
    "linf-twin": "L-inf robust twin",
    "standard": "standard",
    "standard-twin": "standard twin",
}


class ClassifierAccuracy(Constraint):
    """Classification accuracy: p(true class | x_hat) >= kappa, one component per channel of digits.

    Args:
        kappa: the probability the classifier must give the true class, in (0, 1) (e.g. 0.9).
        form: ``"log"`` (``log kappa - log p``, default) or ``"probability"`` (``kappa - p``, the
            paper's); see the module docstring.
        weights: ``"shipped"`` (default): the shipped robust MNIST classifier (PGD-trained in the L2
            ball: ``geco_cla.robust``); ``"twin"`` its twin (the same recipe, another seed);
            ``"linf"`` / ``"linf-twin"``: the L-inf robust pair (FGSM-RS, the default of 0.4.0);
            ``"standard"`` / ``"standard-twin"``: the standard (non-robust) classifier and its twin;
            or a safetensors file of the same architecture.
        use_labels: take the true class from the batch's labels where present (default); otherwise
            from the classifier's prediction on the target.
        smoothing: the std (pixels) of Gaussian noise added to the reconstruction before the
            classifier, a fresh draw each call (0: none, the default).
        validation_confidence: standard errors of the validation mean in GECO's held-out target
            (None, the default: GECO's ``validation_confidence``).
        image_shape: ``(C, 28, 28)``; C digits stacked as channels give C components.
    """

    name = "cla"
    units = "probability of the true class"
    tighter, perfect = 1, 1.0

    def __init__(
        self,
        kappa: float,
        form: str = "log",
        weights: str | None = None,
        use_labels: bool = True,
        image_shape: tuple[int, int, int] | None = None,
        smoothing: float = 0.0,
        validation_confidence: float | None = None,
    ) -> None:
        super().__init__()
        kappa = check_kappa("cla", kappa, 0.0, 1.0, what="a probability in (0, 1)")
        if not 0.0 <= smoothing < math.inf:
            raise ConfigError(f"cla: smoothing must be a noise std >= 0 in pixels, got {smoothing}")
        self.smoothing = float(smoothing)
        self.validation_confidence = None if validation_confidence is None else float(validation_confidence)
        if form not in FORMS:
            raise ConfigError(f"cla: form must be log or probability, got {form!r}")
        channels = 1
        if image_shape is not None:
            channels, h, w = image_shape
            if (h, w) != (28, 28):
                raise ConfigError(f"cla: the classifier reads 28x28 digits, but the images are {tuple(image_shape)}")
        self.kappa, self.form, self.use_labels, self.dim = kappa, form, use_labels, int(channels)
        if form == "log":
            self.value_scale = -math.log(kappa)
            self.multiplier_scale = 1 / self.value_scale
        else:
            self.value_scale, self.multiplier_scale = 1 - kappa, 1 / (1 - kappa)
        self.weights = weights
        self.image_shape = image_shape
        self.classifier = freeze(load_classifier(weights))

    def forward(self, batch: Batch) -> Tensor:
        x, x_hat = batch.x, batch.x_hat
        check_same_shape(self.name, x, x_hat)
        b, c, h, w = x_hat.shape
        if c != self.dim or (h, w) != (28, 28):
            raise ValueError(f"cla: set up for {self.dim} x 28 x 28 images, got {tuple(x_hat.shape[1:])}")
        x_hat = x_hat.reshape(b * c, 1, h, w)
        if self.smoothing:
            x_hat = x_hat + self.smoothing * torch.randn_like(x_hat)
        log_p = torch.log_softmax(self.classifier(x_hat), dim=1)
        log_p_true = log_p.gather(1, self._true_class(batch).reshape(b * c, 1)).reshape(b, c)
        if self.form == "log":
            return math.log(self.kappa) - log_p_true
        return self.kappa - log_p_true.exp()

    def _true_class(self, batch: Batch) -> Tensor:
        b, c = batch.x.shape[:2]
        labels = batch.labels
        if labels is None or not self.use_labels:
            with torch.no_grad():
                logits = self.classifier(batch.x.reshape(b * c, 1, *batch.x.shape[2:]))
                return logits[:, :10].argmax(1).reshape(b, c)  # a digit, never an eleventh "not a digit"
        labels = labels.reshape(b, -1)
        if labels.shape[1] != c:
            raise ValueError(f"cla: {labels.shape[1]} label(s) per example for {c} channel(s) of digits")
        return labels.long()

    def _under(self, weights: str) -> ClassifierAccuracy:
        image_shape = self.image_shape or (self.dim, 28, 28)
        return ClassifierAccuracy(self.kappa, self.form, weights, self.use_labels, image_shape)

    def twin(self) -> ClassifierAccuracy | None:
        """The same constraint under the twin of a shipped classifier (the same recipe, seed 1): a
        reconstruction that only fools the first classifier is caught by the second. None for
        weights of your own."""
        twin = TWINS.get(self.weights or "shipped")
        return None if twin is None else self._under(twin)

    def judges(self) -> dict[str, ClassifierAccuracy]:
        """The twin, and the shipped pair of the other kind (the standard pair for a robust network,
        the default robust pair for a standard one): three networks that did not shape the
        reconstructions, which judge them as they are (no smoothing). None for weights of your own
        (they may read another data set)."""
        weights = self.weights or "shipped"
        if weights not in TWINS:
            return {}
        others = PAIRS[0] if weights in PAIRS[-1] else PAIRS[-1]
        return {"twin": self._under(TWINS[weights]), **{JUDGE_NAMES[w]: self._under(w) for w in others}}

    def reached(self, values: Tensor) -> Tensor:
        """The probability of the true class that mean constraint values stand for: the geometric
        mean ``kappa * exp(-value)`` (log form), the mean ``kappa - value`` (probability form)."""
        return self.kappa * torch.exp(-values) if self.form == "log" else self.kappa - values

    def extra_repr(self) -> str:
        return (
            f"kappa={self.kappa}, form={self.form!r}, components={self.dim}, use_labels={self.use_labels}, "
            f"smoothing={self.smoothing}"
        )


@hookimpl
def geco_register_constraints(register):
    register(ClassifierAccuracy)


@hookimpl
def geco_register_feature_networks(register):
    register(DigitFeatures)
