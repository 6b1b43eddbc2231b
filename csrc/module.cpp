// The Python module fusedrnn._C. It holds no functions: importing it loads this library, whose static
// TORCH_LIBRARY_FRAGMENT registrations (one per source file) add the C++/CUDA kernels as torch ops.
#include <Python.h>

static struct PyModuleDef fusedrnn_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fusedrnn_module);
  if (module == nullptr) return nullptr;
#ifdef FUSEDRNN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
