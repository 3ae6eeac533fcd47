// Where the decode kernel's CTAs land: prints, as JSON, the SM (%smid) of every CTA for the grids
// the Hopper kernel launches at h_kv = 1 ((tiles, 1, partitions) with one CTA per SM, as its
// ~226 KB of shared memory forces), three launches each to show whether the placement repeats, and
// which SMs share a GPC (CTAs of one cluster always do; launches of clusters of 2-16 are merged
// with union-find). kernel-notes.md ("v1.5") has what it found on the H100.
//
//   nvcc -O2 -arch=sm_90a -o /tmp/cta_placement tools/cta_placement.cu && /tmp/cta_placement
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>
#include <numeric>

__device__ unsigned smid() {
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}

__device__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void record(int* out, long long hold_ns) {
  extern __shared__ char s[];
  if (threadIdx.x == 0) {
    int L = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    out[L] = smid();
    s[0] = 1;
  }
  // Hold the SM, so that every CTA of the launch is resident at once, as in the decode kernel.
  unsigned long long t0 = gtime();
  while (gtime() - t0 < (unsigned long long)hold_ns) {}
}

#define CK(x)                                                          \
  do {                                                                 \
    cudaError_t e = (x);                                               \
    if (e != cudaSuccess) {                                            \
      printf("error %s at line %d\n", cudaGetErrorString(e), __LINE__); \
      return 1;                                                        \
    }                                                                  \
  } while (0)

// Union-find root with path halving.
int find(std::vector<int>& p, int a) { while (p[a] != a) a = p[a] = p[p[a]]; return a; }

int main() {
  const int smem = 200 * 1024;
  CK(cudaFuncSetAttribute(record, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(record, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int nsm; CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
  int* d; CK(cudaMalloc(&d, 4096 * 4));
  std::vector<int> h(4096);
  printf("{\"num_sms\": %d,\n", nsm);
  int grids[][3] = {{4, 1, 33}, {2, 1, 66}, {1, 1, 132}};
  for (auto& g : grids) {
    int n = g[0] * g[1] * g[2];
    for (int rep = 0; rep < 3; ++rep) {
      record<<<dim3(g[0], g[1], g[2]), 256, smem>>>(d, 200000);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
      printf("\"dispatch_%dx%dx%d_%d\": [", g[0], g[1], g[2], rep);
      for (int i = 0; i < n; ++i) printf("%d%s", h[i], i + 1 < n ? "," : "");
      printf("],\n");
    }
  }
  // GPC groups: union SMs that share a cluster.
  std::vector<int> parent(nsm);
  std::iota(parent.begin(), parent.end(), 0);
  int sizes[] = {2, 4, 8, 16};
  for (int cs : sizes) {
    for (int rep = 0; rep < 6; ++rep) {
      int nclusters = (nsm / cs) - rep % 3;  // vary the count so that different SMs pair up
      if (nclusters <= 0) continue;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(cs * nclusters, 1, 1);
      cfg.blockDim = dim3(256, 1, 1);
      cfg.dynamicSmemBytes = smem;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = cs;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      cudaError_t e = cudaLaunchKernelEx(&cfg, record, d, (long long)200000);
      if (e != cudaSuccess) {  // e.g. no GPC has room for a cluster of 16
        printf("\"cluster_%d_error\": \"%s\",\n", cs, cudaGetErrorString(e));
        cudaGetLastError();
        break;
      }
      CK(cudaDeviceSynchronize());
      int n = cs * nclusters;
      CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
      for (int i = 0; i < n; ++i) {
        int a = find(parent, h[i]), b = find(parent, h[(i / cs) * cs]);
        if (a != b) parent[a] = b;
      }
    }
  }
  printf("\"gpc_root\": [");
  for (int i = 0; i < nsm; ++i) printf("%d%s", find(parent, i), i + 1 < nsm ? "," : "");
  printf("]}\n");
  return 0;
}
