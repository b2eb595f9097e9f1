"""Public ops: validation + dispatch by ``impl=`` to a backend (see ``_dispatch``)."""
