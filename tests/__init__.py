import os

#: the repository's root, for the tests in every folder below
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
