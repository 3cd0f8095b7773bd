"""PyYAML's safe loader without its silent last-wins for a repeated mapping key."""

from __future__ import annotations

from typing import Any

import yaml


class UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping key given twice is an error at its line (PyYAML keeps
    the last silently: a repeated section would drop every setting of the first). The settings
    file, the API keys file, the routes file and the load tester's scenario files read with it."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)
