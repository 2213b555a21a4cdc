"""Write the course URL from pyproject.toml into every notebook's bootstrap cell and README links.

Publishing the course elsewhere: change `Repository` under [project.urls], then `make sync-url`.
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repo_url() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def main() -> None:
    url = repo_url()
    slug = url.removeprefix("https://github.com/")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = nb.read_text()
        nb.write_text(
            re.sub(r'COURSE_REPO = \\"[^"\\]*\\"', f'COURSE_REPO = \\\\"{url}\\\\"', text)
        )
    readme = ROOT / "README.md"
    text = re.sub(
        r"github/[^/\s]+/[^/\s]+/blob/main", f"github/{slug}/blob/main", readme.read_text()
    )
    text = re.sub(
        r"mybinder\.org/v2/gh/[^/\s]+/[^/\s]+/main", f"mybinder.org/v2/gh/{slug}/main", text
    )
    readme.write_text(text)
    print(f"course URL set to {url}")


if __name__ == "__main__":
    main()
