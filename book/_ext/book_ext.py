"""Small Sphinx fixes for the book.

sphinx-thebe 0.3.1 registers its inline configuration script once per read of the
sources, and Jupyter Book reads them twice, so every page declared `THEBE_JS_URL`
twice and raised a JavaScript error. Each page now gets each script once.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        key = (
            getattr(js, "filename", None) or None,
            tuple(sorted(getattr(js, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
