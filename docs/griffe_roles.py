"""A griffe extension for the documentation site: the docstrings' Sphinx roles as code.

The package's docstrings name other objects the Sphinx way (:class:`~pneumoscope.inference.predictor.Predictor`,
:func:`load`), which `help()` and editors read as they are; mkdocstrings renders Markdown, where a role
would show as ":class:" beside its target. Each becomes a code span of the name (its last part when
written with "~"), as Sphinx itself shows it.
"""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _as_code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite every docstring's Sphinx roles as code spans, once each object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_as_code, obj.docstring.value)
