/* C ABI call / Rust call for the same operation on the same guest (exec of `true`, state query).
 * Prints figures, no pass/fail.  cc c_overhead.c $(pkg-config --cflags --libs anyvm) -o c_overhead
 * ./c_overhead GUEST_DIR WORK_DIR */
#include <anyvm.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, n, sizeof *v, cmp);
  return v[n / 2];
}

static void die(anyvm_error_t *e) {
  if (!e) return;
  fprintf(stderr, "error: %s\n", anyvm_error_message(e));
  exit(1);
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  char spec[4096], cmd[4096], state[2048];
  snprintf(cmd, sizeof cmd, "cp %s/data.qcow2 %s/bench.qcow2", argv[1], argv[2]);
  if (system(cmd) != 0) return 1;
  snprintf(spec, sizeof spec,
           "{\"name\":\"cbench-%d\",\"memory_mib\":192,\"accel\":\"tcg\",\"boot\":{\"kind\":\"kernel\","
           "\"kernel\":\"%s/vmlinuz\",\"initrd\":\"%s/initrd.img\",\"cmdline\":\"console=ttyS0 quiet\"},"
           "\"disks\":[{\"path\":\"%s/bench.qcow2\"}]}",
           (int)getpid(), argv[1], argv[1], argv[2]);
  snprintf(state, sizeof state, "%s/state", argv[2]);
  anyvm_client_t *c;
  anyvm_vm_t *vm;
  die(anyvm_client_open(NULL, state, &c));
  die(anyvm_vm_define_json(c, spec, &vm));
  die(anyvm_vm_start(vm));
  die(anyvm_vm_wait_ready(vm, NULL, 0, false, 120));
  anyvm_exec_t *e;
  die(anyvm_exec_new("true", &e));
  enum { N_EXEC = 60, N_STATE = 300 };
  static double cc[N_STATE], rr[N_STATE];
  const char *ops[] = {"exec_true", "state"};
  const int ns[] = {N_EXEC, N_STATE};
  for (int o = 0; o < 2; o++) {
    for (int i = 0; i < ns[o]; i++) { /* interleaved: same guest conditions for both */
      double t = now();
      if (o == 0) {
        anyvm_exec_result_t *r;
        die(anyvm_vm_exec(vm, e, &r));
        anyvm_exec_result_delete(r);
      } else {
        anyvm_vm_state_t s;
        die(anyvm_vm_state(vm, &s));
      }
      cc[i] = now() - t;
      die(anyvm_bench_rust_timings(vm, ops[o], 1, &rr[i]));
    }
    double mc = median(cc, ns[o]) * 1e3, mr = median(rr, ns[o]) * 1e3;
    printf("%-10s C p50 %8.3f ms   rust p50 %8.3f ms   ratio %.3fx (target <= 1.1x)\n", ops[o], mc, mr, mc / mr);
  }
  anyvm_exec_delete(e);
  die(anyvm_vm_destroy(vm));
  anyvm_vm_delete(vm);
  anyvm_client_delete(c);
  return 0;
}
