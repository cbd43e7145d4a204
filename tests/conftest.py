pytest_plugins = [
    "tests.plugins.services",
    "tests.plugins.s3",
    "tests.plugins.runs",
    "tests.plugins.parallel",
    "tests.plugins.threads",
]
