"""The conformance kit: checks every plugin of a kind must pass, for plugin authors' own tests.

Each ``check_*`` function raises ``AssertionError`` naming the violated
invariant and the component. Typical use in a plugin package's tests::

    from core.testing.solvers import check_solver
    def test_my_solver_conforms():
        check_solver(lambda method, steps: MySolver(MyConfig(steps=steps)), methods={"euler": (1, 1)})

Modules: ``solvers``, ``schedulers``, ``paths``, ``backbones``, ``objectives``,
``launchers``, ``data``, ``metrics``; hypothesis strategies in ``strategies``.
"""
