declare PATH='/nix/store/ikfa7wfzsy90l6n35ic32mpi3y8756wy-bbdir/bin'
declare Upper='U'
declare _u='_'
declare -a arr2=(1 'two' 1  '' 'it'\''s' '@out@/bin' -3 )
declare big=-1294967296
declare builder='/nix/store/ikfa7wfzsy90l6n35ic32mpi3y8756wy-bbdir/bin/sh'
declare ctl='/'
declare -a emptyA=()
declare -A emptyO=()
declare -A env=(['FOO']='bar' )
declare f=
declare fint=3
declare huge=-1506741426
declare -A m2=(['a']=1 ['b']='s' ['c']= ['d']='' ['k'\''ey']='v' ['é']=2 )
declare mid=-2147483648
declare name='sa-test-2'
declare neg=-7
declare nul=''
declare num=42
declare -A outputs=(['dev']='@dev@' ['out']='@out@' )
declare sci=-2147483648
declare system='x86_64-linux'
declare t=1
declare uni='héllo ☃'
