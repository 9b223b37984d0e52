"""The documentation stays true to the tree and to the config: README.md and docs/*.md.

- Every relative link and image resolves to a file in the repository, and an anchor into a
  markdown file names one of its headings (GitHub's slugs).
- docs/training.md's "Configuration reference" has exactly one row per config field
  (trainer/configs/base.py's Config, walked to dotted names) with the field's real default and a
  description; fields with fixed choices name each choice. A field added without its line fails.
- The presets table names every preset; README.md stays short and keeps its two commands.
"""

import dataclasses
import json
import pathlib
import re

import pytest

from trainer import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
README = REPO / 'README.md'
TRAINING = DOCS / 'training.md'
REFERENCE_HEADING = 'Configuration reference'
PRESETS_HEADING = 'Presets'


def markdown_files():
  return [README] + sorted(DOCS.glob('*.md'))


def _without_code(text: str, inline: bool = True) -> str:
  """The text with fenced code blocks blanked out (line numbers kept) and, if `inline`, inline
  code spans removed."""
  out, fence = [], None
  for line in text.splitlines():
    marker = re.match(r'^ {0,3}(`{3,}|~{3,})', line)
    if fence is None and marker:
      fence = marker.group(1)[0] * len(marker.group(1))
      out.append('')
    elif fence is not None:
      if line.strip().startswith(fence):
        fence = None
      out.append('')
    else:
      out.append(re.sub(r'(`+)(?:(?!\1).)+?\1', '', line) if inline else line)
  return '\n'.join(out)


# [text](target) and ![alt](target), optionally with a "title"; the target has no spaces.
_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def links(path: pathlib.Path) -> list[str]:
  return _LINK.findall(_without_code(path.read_text()))


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation dropped."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # Links and images: their text.
  text = text.replace('`', '')
  text = re.sub(r'(\*\*|__|\*)(.+?)\1', r'\2', text)  # Emphasis (underscores in words stay).
  text = re.sub(r'<[^>]+>', '', text).strip().lower()
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
  seen, out = {}, set()
  for line in _without_code(path.read_text(), inline=False).splitlines():
    match = re.match(r'^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$', line)
    if not match:
      continue
    slug = github_slug(match.group(1))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    out.add(slug if count == 0 else f'{slug}-{count}')
  return out


def test_github_slug_rules():
  assert github_slug('`seed_unet`: cost per step and a GPU recipe') == (
      'seed_unet-cost-per-step-and-a-gpu-recipe')
  assert github_slug('Trainer vs bare `model.fit`') == 'trainer-vs-bare-modelfit'
  assert github_slug('Kubernetes (GKE or any cluster >= 1.28)') == (
      'kubernetes-gke-or-any-cluster--128')
  assert github_slug('**Bold** and [a link](x.md)') == 'bold-and-a-link'


def test_link_parser_skips_code():
  text = ('[a](a.md) `[b](b.md)` ![c](img/c.png "title")\n```\n[d](d.md)\n```\n'
          '[e](https://example.com) [f](#anchor)\n')
  assert _LINK.findall(_without_code(text)) == ['a.md', 'img/c.png', 'https://example.com',
                                                 '#anchor']


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_images_resolve(path):
  broken = []
  for target in links(path):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:, ...
      continue
    file_part, _, anchor = target.partition('#')
    resolved = (path.parent / file_part).resolve() if file_part else path
    if not resolved.exists():
      broken.append(f'{target}: no such file {resolved}')
      continue
    try:
      resolved.relative_to(REPO)
    except ValueError:
      broken.append(f'{target}: outside the repository')
      continue
    if anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
      broken.append(f'{target}: no heading #{anchor} in {resolved.relative_to(REPO)}')
  assert not broken, f'{path.relative_to(REPO)}:\n  ' + '\n  '.join(broken)


# ---------------------------------------------------------------------------------------------
# The configuration reference.

def format_default(value) -> str:
  """A default as the reference writes it: as config.json holds it (JSON), strings bare."""
  if isinstance(value, str):
    return value
  return json.dumps(list(value) if isinstance(value, tuple) else value)


def config_fields(config=None, prefix='') -> dict:
  """{dotted name: default} of every leaf field of the config, recursively, in order."""
  config = configs.Config() if config is None else config
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if dataclasses.is_dataclass(value):
      out.update(config_fields(value, f'{prefix}{f.name}.'))
    else:
      out[f'{prefix}{f.name}'] = value
  return out


def section(path: pathlib.Path, heading: str) -> str:
  """The text under `## heading` up to the next heading of level 1 or 2."""
  text = path.read_text()
  match = re.search(rf'^##\s+{re.escape(heading)}\s*$(.*?)(?=^#{{1,2}}\s|\Z)', text, re.M | re.S)
  assert match, f'{path.relative_to(REPO)}: no "## {heading}" section'
  return match.group(1)


def table_rows(text: str) -> list[list[str]]:
  """The cells of each table row in `text`, header and separator rows left out."""
  rows = []
  for line in text.splitlines():
    line = line.strip()
    if not line.startswith('|'):
      continue
    cells = [c.strip() for c in re.split(r'(?<!\\)\|', line.strip('|'))]
    if all(re.fullmatch(r':?-+:?', c) for c in cells):
      continue
    rows.append(cells)
  return rows[1:]  # The header.


def reference_rows() -> dict:
  """{dotted name: (default as written, description)} of the reference table; no duplicates."""
  out, duplicates = {}, []
  for cells in table_rows(section(TRAINING, REFERENCE_HEADING)):
    assert len(cells) == 3, f'reference row with {len(cells)} cells: {cells}'
    name, default, description = cells
    name_match = re.fullmatch(r'`([^`]+)`', name)
    default_match = re.fullmatch(r'`([^`]*)`', default)
    assert name_match and default_match, f'reference row not `field` | `default` | ...: {cells}'
    if name_match.group(1) in out:
      duplicates.append(name_match.group(1))
    out[name_match.group(1)] = (default_match.group(1), description)
  assert not duplicates, f'fields listed twice: {duplicates}'
  return out


def test_config_walk_covers_configs_fields():
  # The walk and trainer.configs' own list of dotted names agree, so neither can drift.
  assert set(config_fields()) == set(configs.FIELDS)


def test_every_config_field_has_a_reference_line():
  rows, fields = reference_rows(), config_fields()
  missing = [name for name in fields if name not in rows]
  unknown = [name for name in rows if name not in fields]
  assert not missing, (f'docs/training.md "{REFERENCE_HEADING}": add a row '
                       f'| `name` | `default` | one line | for: {missing}')
  assert not unknown, f'docs/training.md "{REFERENCE_HEADING}": no such field: {unknown}'
  assert list(rows) == list(fields), 'reference rows out of the order of trainer/configs/base.py'


def test_reference_defaults_are_the_real_defaults():
  rows = reference_rows()
  wrong = {name: (rows[name][0], format_default(value))
           for name, value in config_fields().items()
           if name in rows and rows[name][0] != format_default(value)}
  assert not wrong, f'{{field: (written, real default)}}: {wrong}'


def test_reference_lines_describe_their_fields():
  rows = reference_rows()
  empty = [name for name, (_, description) in rows.items() if len(description) < 10]
  assert not empty, f'reference rows without a description: {empty}'
  for name, allowed in configs.choice_fields().items():
    description = rows[name][1]
    unnamed = [c for c in allowed if f'`{c}`' not in description]
    assert not unnamed, f'{name}: name each choice in its line: {unnamed}'


def test_reference_fails_for_a_field_without_its_line(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Extended(configs.Config):
    new_field: int = 3

  monkeypatch.setattr(configs, 'Config', Extended)
  with pytest.raises(AssertionError, match='new_field'):
    test_every_config_field_has_a_reference_line()


def test_presets_table_names_every_preset():
  names = [re.fullmatch(r'`([^`]+)`', cells[0]).group(1)
           for cells in table_rows(section(TRAINING, PRESETS_HEADING))]
  assert sorted(names) == sorted(configs.PRESETS)


# ---------------------------------------------------------------------------------------------
# README.md.

def test_readme_is_short_and_keeps_its_two_commands():
  text = README.read_text()
  assert len(text.splitlines()) < 250
  lines = [line.strip() for line in text.splitlines()]
  assert 'pip install -e . && python -m trainer.task' in lines
  assert "pip install -e '.[test]' && python -m pytest" in lines
  assert '.ci/run' in text
  # .ci/run runs that second command.
  ci = (REPO / '.ci' / 'run').read_text()
  assert "-e '.[test]'" in ci and re.search(r'^python3? -m pytest$', ci, re.M)


def test_readme_links_every_docs_page():
  targets = {pathlib.PurePosixPath(t.partition('#')[0]) for t in links(README)}
  pages = {pathlib.PurePosixPath('docs', p.name) for p in DOCS.glob('*.md')
           if p.name != 'README.md'}
  assert pages <= targets, f'README.md does not link: {sorted(map(str, pages - targets))}'
