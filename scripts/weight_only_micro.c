/* What a weight-only int8 matmul costs on this CPU: int8 weights in blocks of 32 along K (fp16 scale per block),
 * fp32 activations, fp32 multiply-adds (AVX2 + FMA, as the kernel library is compiled), over the default model's
 * decoder shapes (30 layers of q|k|v, o, gate|up, down: 106 M weights), M rows, columns split over pthreads.
 * A first, unoptimised kernel (docs/quantization.md, "Weights alone in blocks of 32").
 *
 *   gcc -O3 -mavx2 -mfma -mf16c -ffp-contract=off -pthread -o /tmp/weight_only_micro scripts/weight_only_micro.c
 *   /tmp/weight_only_micro ROWS THREADS
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static inline float hsum8(__m256 v){__m128 a=_mm_add_ps(_mm256_castps256_ps128(v),_mm256_extractf128_ps(v,1));a=_mm_add_ps(a,_mm_movehl_ps(a,a));a=_mm_add_ss(a,_mm_movehdup_ps(a));return _mm_cvtss_f32(a);}
static inline __attribute__((always_inline)) void tile(const float*x,int64_t K,int MR,int NC,const int8_t*w,const uint16_t*s,float*y,int64_t N){
  __m256 acc[8][8];
  for(int m=0;m<MR;m++)for(int c=0;c<NC;c++)acc[m][c]=_mm256_setzero_ps();
  for(int64_t b=0;b<K/32;b++){
    for(int c=0;c<NC;c++){
      __m256 sc=_mm256_set1_ps(_cvtsh_ss(s[c*(K/32)+b]));
      const int8_t*wp=w+c*K+b*32;
      for(int q=0;q<4;q++){
        __m256 ws=_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wp+q*8)))),sc);
        for(int m=0;m<MR;m++)acc[m][c]=_mm256_fmadd_ps(ws,_mm256_loadu_ps(x+m*K+b*32+q*8),acc[m][c]);
      }
    }
  }
  for(int m=0;m<MR;m++)for(int c=0;c<NC;c++)y[m*N+c]=hsum8(acc[m][c]);
}
#define TILE(MR,NC) static void tile_##MR##_##NC(const float*x,int64_t K,const int8_t*w,const uint16_t*s,float*y,int64_t N){tile(x,K,MR,NC,w,s,y,N);}
TILE(1,4) TILE(1,8) TILE(2,4) TILE(4,2) TILE(8,1)
static void matmul(const float*x,int M,int64_t K,const int8_t*W,const uint16_t*S,float*y,int64_t N,int64_t n0,int64_t n1){
  for(int m0=0;m0<M;){
    int mr=M-m0>=8?8:M-m0>=4?4:M-m0>=2?2:1;
    int nc=mr==8?1:mr==4?2:mr==2?4:8;
    for(int64_t n=n0;n<n1;n+=nc){
      const int8_t*w=W+n*K;const uint16_t*s=S+n*(K/32);const float*xr=x+m0*K;float*yr=y+m0*N+n;
      if(n+nc>n1){for(int64_t j=n;j<n1;j++){ if(mr==8) tile_8_1(xr,K,W+j*K,S+j*(K/32),y+m0*N+j,N); else if(mr==4){ /*fallback 1 col via 8_1 pieces*/ for(int mm=0;mm<mr;mm++) tile_1_4(xr+mm*K,K,W+j*K,S+j*(K/32),y+(m0+mm)*N+j,N);} else for(int mm=0;mm<mr;mm++) tile_1_4(xr+mm*K,K,W+j*K,S+j*(K/32),y+(m0+mm)*N+j,N);} break;}
      switch(mr){case 8:tile_8_1(xr,K,w,s,yr,N);break;case 4:tile_4_2(xr,K,w,s,yr,N);break;case 2:tile_2_4(xr,K,w,s,yr,N);break;default:tile_1_8(xr,K,w,s,yr,N);}
    }
    m0+=mr;
  }
}
typedef struct{const float*x;int M;int64_t K;const int8_t*W;const uint16_t*S;float*y;int64_t N,n0,n1;}Job;
static void*run(void*p){Job*j=p;matmul(j->x,j->M,j->K,j->W,j->S,j->y,j->N,j->n0,j->n1);return 0;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int M=atoi(argv[1]); int threads=argc>2?atoi(argv[2]):2;
  int64_t shapes[4][2]={{576,960},{576,576},{576,3072},{1536,576}};
  int L=30; int8_t*W[120];uint16_t*S[120];
  for(int l=0;l<L;l++)for(int i=0;i<4;i++){int64_t K=shapes[i][0],N=shapes[i][1];W[l*4+i]=aligned_alloc(64,K*N);S[l*4+i]=aligned_alloc(64,K*N/32*2+64);
    for(int64_t j=0;j<K*N;j++)W[l*4+i][j]=(int8_t)(rand()%255-127); for(int64_t j=0;j<K*N/32;j++)S[l*4+i][j]=_cvtss_sh(0.01f*(1+rand()%5),0);}
  float*x=aligned_alloc(64,8*1536*4),*y=aligned_alloc(64,8*3072*4); for(int i=0;i<8*1536;i++)x[i]=(rand()%1000)/1000.f-0.5f;
  double best=1e9, tot=0; int reps=30;
  for(int r=0;r<reps;r++){double t0=now();
    for(int l=0;l<L;l++)for(int i=0;i<4;i++){int64_t K=shapes[i][0],N=shapes[i][1];pthread_t th[4];Job jb[4];
      for(int t=0;t<threads;t++){int64_t per=(N/threads+7)/8*8;jb[t]=(Job){x,M,K,W[l*4+i],S[l*4+i],y,N,t*per,(t+1)*per<N?(t+1)*per:N};if(t)pthread_create(&th[t],0,run,&jb[t]);}
      run(&jb[0]);for(int t=1;t<threads;t++)pthread_join(th[t],0);}
    double dt=now()-t0; if(r>=3){tot+=dt; if(dt<best)best=dt;}}
  printf("M=%d threads=%d: best %.2f ms, mean %.2f ms (106M weights)\n",M,threads,best*1e3,tot/(reps-3)*1e3);
}
