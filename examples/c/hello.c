/* Boot a VM from anyvm.toml, run one command in it, print the output, stop it.
 *   cc hello.c $(pkg-config --cflags --libs anyvm) -o hello && ./hello anyvm.toml build1 uname -a */
#include <anyvm.h>

#include <stdio.h>

static int fail(anyvm_error_t *err) {
  fprintf(stderr, "error: %s\n", anyvm_error_message(err));
  anyvm_error_delete(err);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s CONFIG MACHINE PROGRAM [ARGS...]\n", argv[0]);
    return 2;
  }
  anyvm_client_t *client = NULL;
  anyvm_vm_t *vm = NULL;
  anyvm_exec_t *exec = NULL;
  anyvm_exec_result_t *res = NULL;
  anyvm_error_t *err;
  int rc = 1;

  if ((err = anyvm_client_open_config(argv[1], &client))) return fail(err);
  if ((err = anyvm_client_up(client, argv[2], 0, &vm))) { rc = fail(err); goto out; }
  if ((err = anyvm_exec_new(argv[3], &exec))) { rc = fail(err); goto stop; }
  for (int i = 4; i < argc; i++)
    if ((err = anyvm_exec_arg(exec, argv[i]))) { rc = fail(err); goto stop; }
  if ((err = anyvm_vm_exec(vm, exec, &res))) { rc = fail(err); goto stop; }
  size_t n = 0;
  const uint8_t *out = anyvm_exec_result_stdout(res, &n);
  fwrite(out, 1, n, stdout);
  rc = anyvm_exec_result_exit_code(res);
stop:
  if ((err = anyvm_vm_stop(vm, false, 60.0, NULL))) fail(err);
out:
  anyvm_exec_result_delete(res);
  anyvm_exec_delete(exec);
  anyvm_vm_delete(vm);
  anyvm_client_delete(client);
  return rc;
}
