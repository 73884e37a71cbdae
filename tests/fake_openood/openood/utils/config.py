"""openood.utils.config.Config: a dict whose keys read as attributes, nested mappings included."""


class Config(dict):
    def __init__(self, **entries):
        super().__init__({key: Config(**value) if isinstance(value, dict) else value for key, value in entries.items()})

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err
